"""The explicit audit API, for what auto-instrumentation cannot see.

Auto-instrumentation knows the route and the SQL; only the application knows which
patients a search returned, why a record was opened, or that data was handed to a third
party. Use these where that knowledge lives::

    with access("read", resource_type="Note", resource_id=note_id, patients=pid,
                purpose="TREAT") as audit:
        note = load(note_id)

    @access("search", resource_type="Patient")
    def find_patients(name): ...          # the audit scope is the call

    annotate(patients=[p.id for p in results], record_count=len(results))

    with disclosure("Acme Insurance", patients=pid, resource_type="Claim",
                    purpose="HPAYMT"):
        send_claim(...)

    login("u-17", success=False)          # a failed login
    with break_glass(patients=pid, reason="ER admission"):
        ...                               # nested access() default to purpose ETREAT

:func:`access` and :func:`disclosure` open a span (an audit event with a duration and an
outcome: failure when the block raises). :func:`record_access` adds a ``phi.access`` span
event to the current span instead: use it when one span touches several records.
:func:`annotate` adds facts to the audit event the current span already is (e.g. a FHIR
search classified automatically). None of these ever raise into your code, and an
exception raised by your block is re-raised untouched.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from phiaudit.instrumentation._attributes import (
    ENDUSER_ID,
    PHI_ACCESS_EVENT,
    PHI_ACTOR_TYPE,
    PHI_AUDIT_ACTION,
    PHI_AUDIT_EVENT,
    PHI_AUDIT_OUTCOME,
    PHI_DEVICE_ID,
    PHI_DISCLOSURE_RECIPIENT,
    PHI_PATIENT_ID,
    PHI_PURPOSE,
    PHI_QUERY,
    PHI_RECORD_COUNT,
    PHI_RESOURCE_ID,
    PHI_RESOURCE_TYPE,
    Action,
    ActorType,
    Outcome,
)

_log = logging.getLogger("phiaudit.instrumentation")
_P = ParamSpec("_P")
_R = TypeVar("_R")

Patients = str | Iterable[str] | None

_default_purpose: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "phiaudit_default_purpose", default=None
)
_provider: trace.TracerProvider | None = None


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """The provider audit spans are created with (default: the global one)."""
    global _provider
    _provider = provider


def _tracer() -> trace.Tracer:
    return trace.get_tracer("phiaudit.instrumentation", tracer_provider=_provider)


def _patients(value: Patients) -> AttributeValue | None:
    if value is None:
        return None
    if isinstance(value, str | int):
        return str(value)
    ids = tuple(dict.fromkeys(str(v) for v in value))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def audit_attributes(
    action: Action | str,
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
    patients: Patients = None,
    record_count: int | None = None,
    purpose: str | None = None,
    query: str | None = None,
    recipient: str | None = None,
    user_id: str | None = None,
    actor_type: ActorType | str | None = None,
    device_id: str | None = None,
    outcome: Outcome | str | None = None,
) -> dict[str, AttributeValue]:
    """The ``phi.*`` attributes of one audit event (raises ValueError on an unknown action)."""
    attrs: dict[str, AttributeValue] = {
        PHI_AUDIT_EVENT: True,
        PHI_AUDIT_ACTION: Action(action).value,
    }
    purpose = purpose if purpose is not None else _default_purpose.get()
    optional: dict[str, AttributeValue | None] = {
        PHI_RESOURCE_TYPE: resource_type,
        PHI_RESOURCE_ID: None if resource_id is None else str(resource_id),
        PHI_PATIENT_ID: _patients(patients),
        PHI_RECORD_COUNT: record_count,
        PHI_PURPOSE: purpose,
        PHI_QUERY: query,
        PHI_DISCLOSURE_RECIPIENT: recipient,
        ENDUSER_ID: user_id,
        PHI_ACTOR_TYPE: None if actor_type is None else ActorType(actor_type).value,
        PHI_DEVICE_ID: device_id,
        PHI_AUDIT_OUTCOME: None if outcome is None else Outcome(outcome).value,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    return attrs


class AuditScope:
    """An audit event spanning a block or a call; see :func:`access`."""

    def __init__(self, attributes: dict[str, AttributeValue], patient_arg: str | None = None):
        self.attributes = attributes
        self._patient_arg = patient_arg
        self._span: Span | None = None
        self._cm: Any = None

    # -- while inside -------------------------------------------------------------------
    def add_patients(self, *patient_ids: str) -> None:
        """Patients touched, learnt inside the block (e.g. search results)."""
        current = self.attributes.get(PHI_PATIENT_ID)
        ids = [current] if isinstance(current, str) else list(current or ())  # type: ignore[arg-type]
        merged = _patients([*map(str, ids), *map(str, patient_ids)])
        if merged is not None:
            self._set(PHI_PATIENT_ID, merged)

    def set_record_count(self, count: int) -> None:
        self._set(PHI_RECORD_COUNT, int(count))

    def fail(self) -> None:
        """Mark the outcome as failure without raising (e.g. access refused)."""
        self._set(PHI_AUDIT_OUTCOME, Outcome.FAILURE.value)

    def _set(self, key: str, value: AttributeValue) -> None:
        self.attributes[key] = value
        try:
            if self._span is not None:
                self._span.set_attribute(key, value)
        except Exception as exc:
            _log.warning("phiaudit: audit attribute not set (%s)", type(exc).__name__)

    # -- context manager ----------------------------------------------------------------
    def __enter__(self) -> AuditScope:
        try:
            name = f"phi.{self.attributes[PHI_AUDIT_ACTION]!s}"
            if PHI_RESOURCE_TYPE in self.attributes:
                name += f" {self.attributes[PHI_RESOURCE_TYPE]!s}"
            self._cm = _tracer().start_as_current_span(
                name,
                attributes=self.attributes,
                record_exception=False,
                set_status_on_exception=False,
            )
            self._span = self._cm.__enter__()
        except Exception as exc:
            _log.error("phiaudit: audit span not started (%s)", type(exc).__name__)
            self._cm = self._span = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._span is not None:
                if PHI_AUDIT_OUTCOME not in self.attributes:
                    failed = exc_type is not None
                    self._span.set_attribute(
                        PHI_AUDIT_OUTCOME, (Outcome.FAILURE if failed else Outcome.SUCCESS).value
                    )
                if exc_type is not None:  # the type only: exception messages may hold PHI
                    self._span.set_status(Status(StatusCode.ERROR, exc_type.__name__))
            if self._cm is not None:
                self._cm.__exit__(None, None, None)
        except Exception as err:
            _log.error("phiaudit: audit span not ended (%s)", type(err).__name__)
        finally:
            self._cm = self._span = None

    # -- decorator ----------------------------------------------------------------------
    def __call__(self, func: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(func)
        template = dict(self.attributes)
        patient_arg = self._patient_arg

        @functools.wraps(func)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            attrs = dict(template)
            if patient_arg is not None:
                try:
                    bound = signature.bind_partial(*args, **kwargs).arguments
                    if bound.get(patient_arg) is not None:
                        attrs[PHI_PATIENT_ID] = str(bound[patient_arg])
                except TypeError:
                    pass  # the call itself will raise the right error
            with AuditScope(attrs):
                return func(*args, **kwargs)

        return wrapper


def _scope(action: Action | str, patient_arg: str | None, **fields: Any) -> AuditScope:
    try:
        return AuditScope(audit_attributes(action, **fields), patient_arg)
    except (ValueError, TypeError) as exc:
        _log.error("phiaudit: invalid audit call (%s); recorded as action only", type(exc).__name__)
        return AuditScope({PHI_AUDIT_EVENT: True, PHI_AUDIT_ACTION: str(action)})


def access(
    action: Action | str,
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
    patients: Patients = None,
    record_count: int | None = None,
    purpose: str | None = None,
    query: str | None = None,
    actor_type: ActorType | str | None = None,
    device_id: str | None = None,
    patient_arg: str | None = None,
) -> AuditScope:
    """An access to PHI, as a context manager or a decorator (``patient_arg`` names the
    decorated function's parameter holding the patient id)."""
    return _scope(
        action,
        patient_arg,
        resource_type=resource_type,
        resource_id=resource_id,
        patients=patients,
        record_count=record_count,
        purpose=purpose,
        query=query,
        actor_type=actor_type,
        device_id=device_id,
    )


def disclosure(
    recipient: str,
    *,
    patients: Patients = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    record_count: int | None = None,
    purpose: str | None = None,
    action: Action | str = Action.DISCLOSE,
) -> AuditScope:
    """PHI handed to ``recipient`` (accounting of disclosures, HIPAA 164.528); use
    ``action="export"`` for a bulk export."""
    return _scope(
        action,
        None,
        recipient=recipient,
        patients=patients,
        resource_type=resource_type,
        resource_id=resource_id,
        record_count=record_count,
        purpose=purpose,
    )


def _emit(attributes: dict[str, AttributeValue]) -> None:
    try:
        name = f"phi.{attributes[PHI_AUDIT_ACTION]!s}"
        _tracer().start_span(name, attributes=attributes).end()
    except Exception as exc:
        _log.error("phiaudit: audit event not emitted (%s)", type(exc).__name__)


def record_access(action: Action | str, **fields: Any) -> None:
    """One access inside the current span, as a ``phi.access`` span event (same keyword
    arguments as :func:`access`). Without a recording span, emits a short audit span."""
    try:
        attrs = audit_attributes(action, **fields)
    except (ValueError, TypeError) as exc:
        _log.error("phiaudit: invalid record_access call (%s)", type(exc).__name__)
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(PHI_ACCESS_EVENT, attributes=attrs)
    else:
        _emit(attrs)


def annotate(
    *,
    patients: Patients = None,
    record_count: int | None = None,
    resource_id: str | None = None,
    purpose: str | None = None,
    recipient: str | None = None,
) -> None:
    """Add facts to the audit event the current span is (patients are merged)."""
    try:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attrs: dict[str, AttributeValue] = {}
        if patients is not None:
            existing = getattr(span, "attributes", {}).get(PHI_PATIENT_ID)
            old = [existing] if isinstance(existing, str) else list(existing or ())
            merged = _patients([*old, *([patients] if isinstance(patients, str) else patients)])
            if merged is not None:
                attrs[PHI_PATIENT_ID] = merged
        pairs = (
            (PHI_RECORD_COUNT, record_count),
            (PHI_RESOURCE_ID, resource_id),
            (PHI_PURPOSE, purpose),
            (PHI_DISCLOSURE_RECIPIENT, recipient),
        )
        for key, value in pairs:
            if value is not None:
                attrs[key] = value
        span.set_attributes(attrs)
    except Exception as exc:
        _log.error("phiaudit: annotate failed (%s)", type(exc).__name__)


def login(user_id: str, *, success: bool = True, device_id: str | None = None) -> None:
    """A login attempt (failed ones feed the repeated-failed-login rule)."""
    _emit(
        audit_attributes(
            Action.LOGIN,
            user_id=str(user_id),
            device_id=device_id,
            outcome=Outcome.SUCCESS if success else Outcome.FAILURE,
        )
    )


def logout(user_id: str) -> None:
    """A logout."""
    _emit(audit_attributes(Action.LOGOUT, user_id=str(user_id), outcome=Outcome.SUCCESS))


@contextmanager
def _purpose(code: str) -> Iterator[None]:
    token = _default_purpose.set(code)
    try:
        yield
    finally:
        _default_purpose.reset(token)


class _BreakGlass:
    def __init__(self) -> None:
        self._cm = _purpose("ETREAT")

    def __enter__(self) -> None:
        self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)


def break_glass(
    *, patients: Patients = None, reason: str | None = None, user_id: str | None = None
) -> _BreakGlass:
    """Emergency access: emits a ``break_glass`` event now; the returned context manager,
    if entered, makes ``ETREAT`` the default purpose of the audit calls inside it.
    ``reason`` is recorded in ``phi.query`` (encrypted by the receiver)."""
    _emit(
        audit_attributes(
            Action.BREAK_GLASS,
            patients=patients,
            purpose="ETREAT",
            query=reason,
            user_id=user_id,
            outcome=Outcome.SUCCESS,
        )
    )
    return _BreakGlass()
