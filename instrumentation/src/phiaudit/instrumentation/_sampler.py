"""A sampler that never samples PHI out.

Standard span processors export only sampled spans, so a PHI span that a ratio sampler
drops would never leave the process. :class:`PhiSampler` wraps any sampler::

    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    sampler = PhiSampler(TraceIdRatioBased(0.01))

* a span classified as PHI at start (FHIR request, PHI route, auth route, explicit
  audit span) is ``RECORD_AND_SAMPLE``, also under a non-sampled parent, and its
  ``phi.*`` tags are added to its attributes;
* a database client span that may touch a PHI table once its statement is set (database
  instrumentations set it after start) is at least ``RECORD_ONLY``: not exported by the
  standard processors, but :class:`PhiSpanProcessor` audits it if it turns out to be PHI;
* everything else is decided by the wrapped sampler.

With ``opentelemetry-instrument``: ``OTEL_TRACES_SAMPLER=phiaudit`` (wraps
``PHIAUDIT_BASE_SAMPLER``, default ``parentbased_always_on``), ``phiaudit_traceidratio`` or
``phiaudit_parentbased_traceidratio`` (ratio in ``OTEL_TRACES_SAMPLER_ARG``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from importlib.metadata import entry_points

from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER_ARG
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from phiaudit.instrumentation._classify import Classifier
from phiaudit.instrumentation._config import ConfigError, InstrumentationConfig
from phiaudit.instrumentation.environment_variables import PHIAUDIT_BASE_SAMPLER

_log = logging.getLogger("phiaudit.instrumentation")

#: the last start-time decision of a :class:`PhiSampler` on this thread, read (once) by
#: :class:`PhiSpanProcessor` in ``on_start``: the SDK starts the span on the same thread
#: right after sampling it, so the span is not classified twice at start
_decided = threading.local()


def take_start_decision(
    classifier: Classifier, trace_id: int, name: str, kind: SpanKind
) -> bool | None:
    """True/False (PHI or not at start) if a :class:`PhiSampler` with ``classifier`` just
    decided for this span on this thread; None when unknown (classify again)."""
    last = getattr(_decided, "last", None)
    if last is None:
        return None
    _decided.last = None
    if last[0] is classifier and last[1] == trace_id and last[2] == name and last[3] is kind:
        return bool(last[4])
    return None


class PhiSampler(Sampler):
    """Samples every PHI span; delegates the others to ``delegate``."""

    def __init__(
        self, delegate: Sampler | None = None, classifier: Classifier | None = None
    ) -> None:
        self.delegate: Sampler = delegate if delegate is not None else ParentBased(ALWAYS_ON)
        self.classifier = classifier or Classifier()

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        try:
            tags = self.classifier.classify(name, kind, attributes)
            _decided.last = (self.classifier, trace_id, name, kind, tags is not None)
        except Exception as exc:  # never fail span creation
            _log.debug("phiaudit: classification failed (%s)", type(exc).__name__)
            tags = None
            _decided.last = None
        if tags is not None:
            state = get_current_span(parent_context).get_span_context().trace_state
            return SamplingResult(Decision.RECORD_AND_SAMPLE, {**(attributes or {}), **tags}, state)
        result = self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if (
            result.decision is Decision.DROP
            and self.classifier.config.record_db_candidates
            and self.classifier.is_db_candidate(name, kind)
        ):
            state = get_current_span(parent_context).get_span_context().trace_state
            return SamplingResult(Decision.RECORD_ONLY, attributes, state)
        return result

    def get_description(self) -> str:
        return f"PhiSampler{{{self.delegate.get_description()}}}"


def classifier_from_env() -> Classifier:
    """A classifier from ``PHIAUDIT_INSTRUMENTATION_CONFIG``; defaults if it is invalid
    (every error is logged, with its key path)."""
    try:
        return Classifier(InstrumentationConfig.from_env().classification)
    except ConfigError as exc:
        for error in exc.errors:
            _log.error("phiaudit: config error: %s (using defaults)", error)
        return Classifier()


def _ratio(arg: str | float | None) -> float:
    try:
        return float(arg if arg not in (None, "") else 1.0)
    except (TypeError, ValueError):
        _log.warning("phiaudit: %s is not a ratio; using 1.0", OTEL_TRACES_SAMPLER_ARG)
        return 1.0


def _named_sampler(name: str, arg: str | float | None) -> Sampler:
    if name in ("traceidratio", "parentbased_traceidratio"):
        ratio = TraceIdRatioBased(_ratio(arg))
        return ratio if name == "traceidratio" else ParentBased(ratio)
    for ep in entry_points(group="opentelemetry_traces_sampler", name=name):
        sampler = ep.load()(arg)
        if isinstance(sampler, Sampler):
            return sampler
    _log.error("phiaudit: unknown base sampler %r; using parentbased_always_on", name)
    return ParentBased(ALWAYS_ON)


def phiaudit_sampler(arg: str | float | None = None) -> PhiSampler:
    """Entry point ``phiaudit``: wraps the sampler named by ``PHIAUDIT_BASE_SAMPLER``."""
    base = os.environ.get(PHIAUDIT_BASE_SAMPLER, "parentbased_always_on").strip()
    return PhiSampler(_named_sampler(base, arg), classifier_from_env())


def phiaudit_traceidratio(arg: str | float | None = None) -> PhiSampler:
    """Entry point ``phiaudit_traceidratio``."""
    return PhiSampler(TraceIdRatioBased(_ratio(arg)), classifier_from_env())


def phiaudit_parentbased_traceidratio(arg: str | float | None = None) -> PhiSampler:
    """Entry point ``phiaudit_parentbased_traceidratio``."""
    return PhiSampler(ParentBased(TraceIdRatioBased(_ratio(arg))), classifier_from_env())
