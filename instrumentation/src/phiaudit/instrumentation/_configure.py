"""One call to audit an application: :func:`configure`.

::

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from phiaudit.instrumentation import configure

    audit = configure(OTLPSpanExporter(endpoint="http://127.0.0.1:4317", insecure=True))

installs, on the global SDK ``TracerProvider`` (created if there is none):

* :class:`PhiSampler` around the provider's sampler (or ``base_sampler``), so PHI spans
  are always sampled;
* :class:`PhiSpanProcessor` with an :class:`AuditDelivery` to ``exporter`` (spooled on
  disk, retried until acknowledged).

Call it before the application asks for tracers: a tracer obtained earlier keeps the old
sampler. A bad configuration never raises (unless ``strict=True``): its errors are logged
with their key paths, returned in ``PhiAudit.errors``, and the defaults are used.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace

from opentelemetry import metrics, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import Sampler

from phiaudit.instrumentation import _api
from phiaudit.instrumentation._classify import Classifier
from phiaudit.instrumentation._config import ConfigError, InstrumentationConfig
from phiaudit.instrumentation._delivery import AuditDelivery
from phiaudit.instrumentation._processor import PhiSpanProcessor
from phiaudit.instrumentation._sampler import PhiSampler
from phiaudit.instrumentation._users import UserResolver, flask_user

_log = logging.getLogger("phiaudit.instrumentation")


@dataclass
class PhiAudit:
    """What :func:`configure` installed."""

    config: InstrumentationConfig
    classifier: Classifier
    processor: PhiSpanProcessor
    tracer_provider: TracerProvider
    sampler: PhiSampler | None
    delivery: AuditDelivery | None
    errors: list[str] = field(default_factory=list)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until every audit span so far is acknowledged by the exporter."""
        return self.processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush (to the exporter, else to the spool) and stop the delivery threads."""
        self.processor.shutdown()


def load_config(
    config: InstrumentationConfig | str | os.PathLike[str] | None, *, strict: bool = False
) -> tuple[InstrumentationConfig, list[str]]:
    """Resolve a configuration (object, file path, or ``PHIAUDIT_INSTRUMENTATION_CONFIG``);
    on errors, log them and fall back to the defaults (or raise when ``strict``)."""
    try:
        if config is None:
            resolved = InstrumentationConfig.from_env()
        elif isinstance(config, InstrumentationConfig):
            errors = config.validate()
            if errors:
                raise ConfigError(errors)
            resolved = config
        else:
            resolved = InstrumentationConfig.from_file(config)
        return resolved, []
    except ConfigError as exc:
        if strict:
            raise
        for error in exc.errors:
            _log.error("phiaudit: config error: %s (using defaults)", error)
        return InstrumentationConfig(), list(exc.errors)


def open_delivery(
    exporter: SpanExporter,
    config: InstrumentationConfig,
    meter_provider: metrics.MeterProvider | None = None,
) -> AuditDelivery:
    """An :class:`AuditDelivery`; if the spool directory is unusable, reports it and falls
    back to a per-user directory under the system temporary directory."""
    try:
        return AuditDelivery(exporter, config.delivery, meter_provider=meter_provider)
    except OSError as exc:
        fallback = os.path.join(tempfile.gettempdir(), f"phiaudit-spool-{os.getuid()}")
        _log.error(
            "phiaudit: spool directory unusable (%s); using %s", type(exc).__name__, fallback
        )
        delivery = replace(config.delivery, spool_dir=fallback)
        return AuditDelivery(exporter, delivery, meter_provider=meter_provider)


def configure(
    exporter: SpanExporter | None = None,
    *,
    config: InstrumentationConfig | str | os.PathLike[str] | None = None,
    tracer_provider: TracerProvider | None = None,
    base_sampler: Sampler | None = None,
    user_resolver: UserResolver | None = flask_user,
    meter_provider: metrics.MeterProvider | None = None,
    strict: bool = False,
) -> PhiAudit:
    """Audit every PHI span of this process; see the module documentation."""
    resolved, errors = load_config(config, strict=strict)
    classifier = Classifier(resolved.classification)
    provider = tracer_provider
    sampler: PhiSampler | None = None
    if provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            provider = current
        else:
            sampler = PhiSampler(base_sampler, classifier)
            provider = TracerProvider(sampler=sampler)
            trace.set_tracer_provider(provider)
    if sampler is None:
        # TracerProvider.sampler is a plain attribute, passed to each tracer it creates:
        # tracers created from now on use the wrapped sampler.
        existing = provider.sampler
        if isinstance(existing, PhiSampler):
            sampler = existing
        else:
            sampler = PhiSampler(base_sampler or existing, classifier)
            provider.sampler = sampler
    delivery = open_delivery(exporter, resolved, meter_provider) if exporter else None
    processor = PhiSpanProcessor(classifier, delivery, user_resolver=user_resolver)
    provider.add_span_processor(processor)
    _api.set_tracer_provider(provider)
    return PhiAudit(resolved, classifier, processor, provider, sampler, delivery, errors)
