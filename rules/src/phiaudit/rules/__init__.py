"""phiaudit.rules: correlation and anomaly rules compiled to ClickHouse SQL (issue 5).

Nothing is public yet; the package exists so that the layout and the import contract hold.
"""

__all__: list[str] = []

# delivery, care relationships (helper "delivery")
from ._care import OPEN_END_US, CareFileError, care_rows, care_rows_from_bytes
from ._sinks import (
    AlertMessage,
    DeliveryFailed,
    OtlpSink,
    Sink,
    StdoutSink,
    WebhookSink,
    build_sinks,
    deliver_pending,
)

__all__ += [
    "OPEN_END_US", "AlertMessage", "CareFileError", "DeliveryFailed", "OtlpSink", "Sink",
    "StdoutSink", "WebhookSink", "build_sinks", "care_rows", "care_rows_from_bytes",
    "deliver_pending",
]
