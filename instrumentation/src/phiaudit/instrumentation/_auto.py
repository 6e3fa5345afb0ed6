"""Zero-code set-up: ``OTEL_PYTHON_DISTRO=phiaudit opentelemetry-instrument python app.py``.

Loaded only by ``opentelemetry-instrument`` (it needs ``opentelemetry-instrumentation``,
which provides the distro base class). The distro only sets defaults
(``os.environ.setdefault``): ``OTEL_TRACES_SAMPLER=phiaudit`` and
``OTEL_PYTHON_CONFIGURATOR=phiaudit``. The configurator then sets up the SDK as the
standard one does, plus:

* the configured sampler (whatever ``OTEL_TRACES_SAMPLER`` names) wrapped in
  :class:`PhiSampler` if it is not one already;
* :class:`PhiSpanProcessor` delivering audit spans to the exporter named by
  ``PHIAUDIT_EXPORTER`` (default ``otlp_proto_grpc``) at ``PHIAUDIT_ENDPOINT``;
* the exporters of ``OTEL_TRACES_EXPORTER`` wrapped in :func:`without_phi`, so PHI spans
  travel only on the audit path.

Configuration: ``PHIAUDIT_INSTRUMENTATION_CONFIG`` and the other variables of
:mod:`phiaudit.instrumentation.environment_variables`. Errors are logged at start-up; the
application starts regardless (without an audit exporter if none can be loaded).
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Any

from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]
from opentelemetry.sdk._configuration import _OTelSDKConfigurator
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from phiaudit.instrumentation import _api
from phiaudit.instrumentation._classify import Classifier
from phiaudit.instrumentation._configure import load_config, open_delivery
from phiaudit.instrumentation._processor import PhiSpanProcessor, without_phi
from phiaudit.instrumentation._sampler import PhiSampler, phiaudit_sampler
from phiaudit.instrumentation.environment_variables import PHIAUDIT_ENDPOINT, PHIAUDIT_EXPORTER

_log = logging.getLogger("phiaudit.instrumentation")
OTEL_PYTHON_CONFIGURATOR = "OTEL_PYTHON_CONFIGURATOR"


class PhiAuditDistro(BaseDistro):  # type: ignore[misc]  # the base class is untyped
    """Entry point ``opentelemetry_distro: phiaudit``."""

    def _configure(self, **kwargs: Any) -> None:
        os.environ.setdefault(OTEL_TRACES_SAMPLER, "phiaudit")
        os.environ.setdefault(OTEL_PYTHON_CONFIGURATOR, "phiaudit")


def audit_exporter() -> SpanExporter | None:
    """The exporter of the audit path, from ``PHIAUDIT_EXPORTER``/``PHIAUDIT_ENDPOINT``."""
    name = os.environ.get(PHIAUDIT_EXPORTER, "otlp_proto_grpc").strip()
    endpoint = os.environ.get(PHIAUDIT_ENDPOINT)
    for ep in entry_points(group="opentelemetry_traces_exporter", name=name):
        try:
            factory = ep.load()
            exporter = factory(endpoint=endpoint) if endpoint else factory()
        except Exception as exc:
            _log.error("phiaudit: audit exporter %r failed to load (%s)", name, type(exc).__name__)
            return None
        if isinstance(exporter, SpanExporter):
            return exporter
    _log.error("phiaudit: no span exporter named %r: PHI audit spans are NOT exported", name)
    return None


class PhiAuditConfigurator(_OTelSDKConfigurator):
    """Entry point ``opentelemetry_configurator: phiaudit``."""

    def _configure(self, **kwargs: Any) -> None:
        config, _ = load_config(None)
        classifier = Classifier(config.classification)
        sampler = kwargs.get("sampler")
        if sampler is None:
            from opentelemetry.sdk._configuration import _get_sampler, _import_sampler

            sampler = _import_sampler(_get_sampler())
        if isinstance(sampler, PhiSampler):
            sampler.classifier = classifier
        else:
            sampler = PhiSampler(sampler, classifier) if sampler else phiaudit_sampler()
        kwargs["sampler"] = sampler
        exporter = audit_exporter()
        delivery = open_delivery(exporter, config) if exporter is not None else None
        processor = PhiSpanProcessor(classifier, delivery)
        kwargs["span_processors"] = [processor, *kwargs.get("span_processors", ())]

        def export_processor(span_exporter: SpanExporter, *a: Any, **kw: Any) -> SpanProcessor:
            return without_phi(BatchSpanProcessor(span_exporter, *a, **kw), classifier)

        kwargs.setdefault("export_span_processor", export_processor)
        super()._configure(**kwargs)  # type: ignore[no-untyped-call]  # untyped in the SDK
        from opentelemetry import trace

        _api.set_tracer_provider(trace.get_tracer_provider())
