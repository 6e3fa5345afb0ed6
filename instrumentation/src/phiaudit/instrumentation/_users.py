"""Who acted: the ``enduser.id`` of an audit event.

No OpenTelemetry instrumentation sets ``enduser.id``, so phiaudit finds the user in one of
three ways, in this order:

1. the span already has ``enduser.id`` (or ``user.id``);
2. the application called :func:`identify` in the same trace (typically in its
   authentication code), which tags the current span and every PHI span of the trace
   that ends afterwards;
3. a *user resolver*, called when a PHI span ends without a user: a function of no
   argument returning an :class:`Actor`, a user id, or None. The default,
   :func:`flask_user`, reads Flask's ``g`` and request when a Flask request is active.

For frameworks whose request object is not global, :func:`user_from_request` reads a
Django, Starlette/FastAPI or Flask request (duck-typed: nothing is imported), and
:func:`django_response_hook` plugs it into ``DjangoInstrumentor(response_hook=...)``.
A resolver or hook that raises is logged (its exception type only) and ignored.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from phiaudit.instrumentation._attributes import ENDUSER_ID, PHI_ACTOR_TYPE, USER_ROLES, ActorType

_log = logging.getLogger("phiaudit.instrumentation")


@dataclass(frozen=True)
class Actor:
    """A user (or system, or patient) acting on PHI."""

    id: str
    roles: tuple[str, ...] = ()
    type: ActorType = ActorType.USER

    def attributes(self) -> dict[str, AttributeValue]:
        attrs: dict[str, AttributeValue] = {ENDUSER_ID: self.id, PHI_ACTOR_TYPE: self.type.value}
        if self.roles:
            attrs[USER_ROLES] = self.roles
        return attrs


UserResolver = Callable[[], "Actor | str | None"]


class _TraceIdentities:
    """Identity per trace id, set by :func:`identify`; bounded, cleared at local root end."""

    def __init__(self, capacity: int = 10000) -> None:
        self._items: OrderedDict[int, Actor] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def set(self, trace_id: int, actor: Actor) -> None:
        with self._lock:
            self._items[trace_id] = actor
            self._items.move_to_end(trace_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, trace_id: int) -> Actor | None:
        return self._items.get(trace_id)

    def discard(self, trace_id: int) -> None:
        with self._lock:
            self._items.pop(trace_id, None)


TRACE_IDENTITIES = _TraceIdentities()


def identify(
    user_id: str, *, roles: Iterable[str] = (), actor_type: ActorType | str = ActorType.USER
) -> None:
    """Declare who is acting in the current trace (call it where you authenticate)."""
    try:
        actor = Actor(str(user_id), tuple(str(r) for r in roles), ActorType(actor_type))
        span = trace.get_current_span()
        ctx = span.get_span_context()
        if ctx.is_valid:
            TRACE_IDENTITIES.set(ctx.trace_id, actor)
        if span.is_recording():
            span.set_attributes(actor.attributes())
    except Exception as exc:
        _log.warning("phiaudit: identify() failed (%s)", type(exc).__name__)


def as_actor(value: Any) -> Actor | None:
    """An :class:`Actor` from a resolver result or a framework user object, else None."""
    if value is None:
        return None
    if isinstance(value, Actor):
        return value
    if isinstance(value, str):
        return Actor(value) if value else None
    if getattr(value, "is_authenticated", True) is False:
        return None  # Django AnonymousUser, Starlette UnauthenticatedUser, flask-login
    ident: Any = None
    for getter in ("get_id", "get_username"):  # flask-login, Django
        fn = getattr(value, getter, None)
        if callable(fn):
            ident = fn()
            break
    for attr in ("identity", "username", "id", "pk"):  # Starlette, generic objects
        if ident is None:
            ident = getattr(value, attr, None)
    if ident is None or ident == "":
        return None
    raw_roles = getattr(value, "roles", ()) or ()
    roles = tuple(
        r if isinstance(r, str) else str(getattr(r, "name", r))
        for r in (raw_roles if isinstance(raw_roles, list | tuple | set | frozenset) else ())
    )
    return Actor(str(ident), roles)


def flask_user() -> Actor | None:
    """The user of the active Flask request: ``g.phiaudit_user``, ``g.user``,
    flask-login's user, or ``REMOTE_USER``; None outside a request."""
    flask = sys.modules.get("flask")
    if flask is None or not flask.has_request_context():
        return None
    for name in ("phiaudit_user", "user", "_login_user"):
        actor = as_actor(getattr(flask.g, name, None))
        if actor is not None:
            return actor
    return as_actor(flask.request.environ.get("REMOTE_USER"))


def user_from_request(request: Any) -> Actor | None:
    """The user of a Django, Starlette/FastAPI or Flask request object (or ASGI scope)."""
    try:
        if isinstance(request, dict):  # an ASGI scope
            return as_actor(request.get("user"))
        scope = getattr(request, "scope", None)
        if isinstance(scope, dict):  # Starlette/FastAPI: AuthenticationMiddleware
            actor = as_actor(scope.get("user"))
            auth = scope.get("auth")
            scopes = tuple(getattr(auth, "scopes", ()) or ())
            if actor is not None and scopes and not actor.roles:
                actor = Actor(actor.id, tuple(str(s) for s in scopes), actor.type)
            return actor
        if hasattr(request, "META") and hasattr(request, "user"):  # Django
            return as_actor(request.user)
        environ = getattr(request, "environ", None)
        if isinstance(environ, dict):  # Flask / Werkzeug
            return as_actor(environ.get("REMOTE_USER"))
    except Exception as exc:
        _log.warning("phiaudit: reading the request user failed (%s)", type(exc).__name__)
    return None


def django_response_hook(span: Any, request: Any, response: Any) -> None:
    """For ``DjangoInstrumentor().instrument(response_hook=django_response_hook)``."""
    try:
        actor = user_from_request(request)
        if actor is not None and span.is_recording():
            span.set_attributes(actor.attributes())
    except Exception as exc:
        _log.warning("phiaudit: django_response_hook failed (%s)", type(exc).__name__)


def resolve(resolver: UserResolver | None) -> Actor | None:
    """Call ``resolver`` safely: its exceptions are logged, never propagated."""
    if resolver is None:
        return None
    try:
        return as_actor(resolver())
    except Exception as exc:
        _log.warning(
            "phiaudit: the user resolver raised %s; event kept without user", type(exc).__name__
        )
        return None
