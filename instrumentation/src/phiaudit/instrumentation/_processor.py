"""The span processor that turns PHI spans into audit events and delivers them.

:class:`PhiSpanProcessor` does two things:

* in ``on_start``, while the span is still writable, it adds the ``phi.*`` tags that the
  start attributes allow (:mod:`._classify`), the user known for the trace, and moves a
  query string out of ``url.query``/``http.target``/``url.full`` into ``phi.query``;
* in ``on_end`` it classifies again with the final attributes (a database statement, the
  HTTP status, a user set during the request), and hands every audit span (tagged, or
  carrying ``phi.access`` events) with those tags and the user to :class:`AuditDelivery`,
  which never drops silently. It does so whether or not the span is sampled. The enriched
  attributes (outcome, ``phi.query``, redactions, user) are built by the delivery's intake
  thread, off the request thread.

Because audit spans have their own export path, wrap your other processors with
:func:`without_phi` so that PHI (and the clear query strings an instrumentation may set
again after start) does not also flow to a general-purpose tracing backend.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode
from opentelemetry.util.types import AttributeValue

from phiaudit.instrumentation._attributes import (
    ENDUSER_ID,
    PHI_ACCESS_EVENT,
    PHI_AUDIT_OUTCOME,
    PHI_QUERY,
    USER_ID,
    Outcome,
)
from phiaudit.instrumentation._classify import (
    Classifier,
    Tags,
    http_path_query,
    query_redactions,
    span_attributes,
)
from phiaudit.instrumentation._delivery import AuditDelivery, PendingSpan
from phiaudit.instrumentation._sampler import take_start_decision
from phiaudit.instrumentation._users import (
    TRACE_IDENTITIES,
    Actor,
    UserResolver,
    flask_user,
    resolve,
)

_log = logging.getLogger("phiaudit.instrumentation")

#: the last end-time decision of a :class:`PhiSpanProcessor` on this thread: (span,
#: classifier, is audit span). The SDK calls the processors in the order they were added,
#: on the thread that ends the span, so :func:`without_phi` (added after) reuses it
_ended = threading.local()


def _has_access_events(span: ReadableSpan) -> bool:
    return any(event.name == PHI_ACCESS_EVENT for event in span.events)


class _ErrorLog:
    """Logs an internal error at most once a minute, type only (messages may hold PHI)."""

    def __init__(self) -> None:
        self._last = 0.0
        self.count = 0

    def __call__(self, where: str, exc: BaseException) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= 60:
            self._last = now
            _log.error(
                "phiaudit: internal error in %s (%s); %d so far",
                where,
                type(exc).__name__,
                self.count,
            )


class PhiSpanProcessor(SpanProcessor):
    """Tags PHI spans and delivers them through ``delivery`` (when given).

    Without a ``delivery`` it only tags, and the audit spans go wherever your other
    processors send them (then they must be sampled: use :class:`PhiSampler`).
    """

    def __init__(
        self,
        classifier: Classifier | None = None,
        delivery: AuditDelivery | None = None,
        *,
        user_resolver: UserResolver | None = flask_user,
    ) -> None:
        self.classifier = classifier or Classifier()
        self.delivery = delivery
        self.user_resolver = user_resolver
        self._errors = _ErrorLog()

    def is_audit_span(self, span: ReadableSpan) -> bool:
        """True for a span that is, or carries, a PHI audit event."""
        return _has_access_events(span) or (
            self.classifier.classify(span.name, span.kind, span_attributes(span), ended=True)
            is not None
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            attrs = span_attributes(span)
            ctx = span.get_span_context()
            sampled = take_start_decision(self.classifier, ctx.trace_id, span.name, span.kind)
            if sampled is None:
                tags = self.classifier.classify(span.name, span.kind, attrs)
            else:  # a PhiSampler just classified it, and added its tags to the attributes
                tags = {} if sampled else None
            actor = TRACE_IDENTITIES.get(ctx.trace_id) if ctx is not None else None
            if actor is not None and ENDUSER_ID not in attrs:
                span.set_attributes(actor.attributes())
            if tags is not None:
                if tags:
                    span.set_attributes(tags)
                redactions = query_redactions(attrs)
                if redactions:
                    span.set_attributes(redactions)
        except Exception as exc:
            self._errors("on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._on_end(span)
        except Exception as exc:
            self._errors("on_end", exc)

    def _on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is not None and (span.parent is None or span.parent.is_remote):
            actor = TRACE_IDENTITIES.get(ctx.trace_id)  # the local root ends: forget it
            TRACE_IDENTITIES.discard(ctx.trace_id)
        else:
            actor = TRACE_IDENTITIES.get(ctx.trace_id) if ctx is not None else None
        if self.delivery is None:
            return
        attributes = span_attributes(span)
        tags = self.classifier.classify(span.name, span.kind, attributes, ended=True)
        is_audit = tags is not None or _has_access_events(span)
        _ended.last = (span, self.classifier, is_audit)
        if not is_audit:
            return
        # only what needs this thread (the request context) is done here: the rest of the
        # enrichment runs on the delivery's intake thread (_Enriched.attributes)
        if (
            ENDUSER_ID not in attributes
            and USER_ID not in attributes
            and (tags is None or (ENDUSER_ID not in tags and USER_ID not in tags))
        ):
            actor = actor or resolve(self.user_resolver)
        else:
            actor = None
        self.delivery.submit(_Enriched(span, tags, actor))

    def shutdown(self) -> None:
        if self.delivery is not None:
            self.delivery.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self.delivery is None:
            return True
        return self.delivery.force_flush(timeout_millis)


class _Enriched(PendingSpan):
    """An ended audit span, its end-time tags and the actor known on the request thread;
    the attributes to deliver are computed on the delivery thread."""

    __slots__ = ("actor", "tags")

    def __init__(self, span: ReadableSpan, tags: Tags | None, actor: Actor | None) -> None:
        super().__init__(span)
        self.tags = tags
        self.actor = actor

    def attributes(self) -> dict[str, AttributeValue]:
        span, tags = self.span, self.tags
        attrs: dict[str, AttributeValue] = dict(span_attributes(span))
        if tags:
            attrs.update(tags)
        if tags is not None:
            if PHI_AUDIT_OUTCOME not in attrs and span.status.status_code is StatusCode.ERROR:
                attrs[PHI_AUDIT_OUTCOME] = Outcome.FAILURE.value
            if PHI_QUERY not in attrs:
                _, query = http_path_query(attrs)
                if query:
                    attrs[PHI_QUERY] = query
            attrs.update(query_redactions(attrs))
        if ENDUSER_ID not in attrs and USER_ID not in attrs and self.actor is not None:
            attrs.update(self.actor.attributes())
        return attrs


class _WithoutPhi(SpanProcessor):
    def __init__(self, processor: SpanProcessor, classifier: Classifier) -> None:
        self._processor = processor
        self._audit = PhiSpanProcessor(classifier, user_resolver=None)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            last = getattr(_ended, "last", None)
            if last is not None and last[0] is span and last[1] is self._audit.classifier:
                _ended.last = None
                is_audit: bool = last[2]
            else:
                is_audit = self._audit.is_audit_span(span)
            if is_audit:
                return
        except Exception:  # unclassifiable: keep it away from the general pipeline
            return
        self._processor.on_end(span)

    def shutdown(self) -> None:
        self._processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def without_phi(processor: SpanProcessor, classifier: Classifier | None = None) -> SpanProcessor:
    """Wrap ``processor`` so that it never sees the end of an audit span (those go through
    :class:`PhiSpanProcessor`'s own export path)."""
    return _WithoutPhi(processor, classifier or Classifier())
