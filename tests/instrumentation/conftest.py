"""Fixtures: a real SDK TracerProvider audited by phiaudit, with in-memory exporters.

The in-memory exporters are the SDK's own (``InMemorySpanExporter``); the spool is a real
directory. Nothing touches the global tracer provider.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler, TraceIdRatioBased

from phiaudit.instrumentation import (
    DeliveryConfig,
    InstrumentationConfig,
    PhiAudit,
    configure,
    without_phi,
)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "instrumentation"
if str(SAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(SAMPLE_DIR))


def fast_delivery(spool_dir: Path, **overrides: object) -> DeliveryConfig:
    """Delivery settings with short waits, so tests run quickly."""
    base = DeliveryConfig(
        spool_dir=str(spool_dir),
        schedule_delay_seconds=0.01,
        retry_initial_seconds=0.01,
        retry_max_seconds=0.05,
        fsync=False,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class Audited:
    """A provider audited by phiaudit: ``audit`` gets PHI spans, ``general`` the rest."""

    provider: TracerProvider
    audit: PhiAudit
    audit_exporter: InMemorySpanExporter
    general_exporter: InMemorySpanExporter

    def audit_spans(self) -> tuple[ReadableSpan, ...]:
        assert self.audit.force_flush(5000)
        return self.audit_exporter.get_finished_spans()

    def general_spans(self) -> tuple[ReadableSpan, ...]:
        return self.general_exporter.get_finished_spans()


def make_audited(
    spool_dir: Path,
    config: InstrumentationConfig | None = None,
    base_sampler: Sampler | None = None,
) -> Audited:
    config = config or InstrumentationConfig()
    config = replace(config, delivery=fast_delivery(spool_dir))
    provider = TracerProvider(sampler=base_sampler or TraceIdRatioBased(0.0))
    audit_exporter, general_exporter = InMemorySpanExporter(), InMemorySpanExporter()
    audit = configure(audit_exporter, config=config, tracer_provider=provider, strict=True)
    provider.add_span_processor(
        without_phi(SimpleSpanProcessor(general_exporter), audit.classifier)
    )
    return Audited(provider, audit, audit_exporter, general_exporter)


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[Audited]:
    a = make_audited(tmp_path / "spool")
    yield a
    a.provider.shutdown()
