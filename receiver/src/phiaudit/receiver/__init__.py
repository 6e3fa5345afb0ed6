"""phiaudit.receiver: the service. OTLP gRPC receiver, extraction of PHI audit events,
pipeline wiring and lifecycle, and the ``phiaudit`` command line."""

from ._config import DEFAULT_SENSITIVE_ATTRIBUTES, ServiceConfig, load_config
from ._extract import Extracted, Extractor, ExtractStats
from ._service import Service, run_service, serve_until_signalled

__all__ = [
    "DEFAULT_SENSITIVE_ATTRIBUTES",
    "ExtractStats",
    "Extracted",
    "Extractor",
    "Service",
    "ServiceConfig",
    "load_config",
    "run_service",
    "serve_until_signalled",
]
