"""Environment variables read by ``phiaudit.instrumentation``.

Each name is defined once here; the values documented are the defaults used when a
variable is unset. ``opentelemetry-instrument`` users configure phiaudit through these
(``OTEL_*`` variables keep their usual meaning).
"""

from typing import Final

PHIAUDIT_INSTRUMENTATION_CONFIG: Final = "PHIAUDIT_INSTRUMENTATION_CONFIG"
"""
.. envvar:: PHIAUDIT_INSTRUMENTATION_CONFIG

Path of a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) file holding the
classification and delivery configuration, in the shape of
:class:`phiaudit.instrumentation.InstrumentationConfig` (see its ``from_mapping``).
Unset: the built-in defaults (FHIR under ``/fhir``, auth under ``/login``/``/logout``).
"""

PHIAUDIT_SPOOL_DIR: Final = "PHIAUDIT_SPOOL_DIR"
"""
.. envvar:: PHIAUDIT_SPOOL_DIR

Directory of the on-disk spool for PHI audit spans the exporter has not acknowledged yet.
Default: ``$XDG_STATE_HOME/phiaudit/spool`` (``~/.local/state/phiaudit/spool``).
"""

PHIAUDIT_SPOOL_MAX_BYTES: Final = "PHIAUDIT_SPOOL_MAX_BYTES"
"""
.. envvar:: PHIAUDIT_SPOOL_MAX_BYTES

Size cap of the spool in bytes (default 256 MiB). Only past this cap are audit spans
dropped, and then counted and reported.
"""

PHIAUDIT_EXPORTER: Final = "PHIAUDIT_EXPORTER"
"""
.. envvar:: PHIAUDIT_EXPORTER

Auto-instrumentation only: name of the ``opentelemetry_traces_exporter`` entry point that
delivers PHI audit spans (default ``otlp_proto_grpc``, i.e. ``OTLPSpanExporter``).
"""

PHIAUDIT_ENDPOINT: Final = "PHIAUDIT_ENDPOINT"
"""
.. envvar:: PHIAUDIT_ENDPOINT

Auto-instrumentation only: endpoint passed to that exporter, e.g.
``http://127.0.0.1:4317`` for the phiaudit receiver. Unset: the exporter's own default
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""

PHIAUDIT_BASE_SAMPLER: Final = "PHIAUDIT_BASE_SAMPLER"
"""
.. envvar:: PHIAUDIT_BASE_SAMPLER

For ``OTEL_TRACES_SAMPLER=phiaudit``: the name of the sampler (``opentelemetry_traces_sampler``
entry point) that decides for spans without PHI; default ``parentbased_always_on``.
Its argument is ``OTEL_TRACES_SAMPLER_ARG``.
"""

__all__ = [
    "PHIAUDIT_BASE_SAMPLER",
    "PHIAUDIT_ENDPOINT",
    "PHIAUDIT_EXPORTER",
    "PHIAUDIT_INSTRUMENTATION_CONFIG",
    "PHIAUDIT_SPOOL_DIR",
    "PHIAUDIT_SPOOL_MAX_BYTES",
]
