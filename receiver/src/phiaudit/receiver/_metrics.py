"""Self-metrics: counters without labels that could carry PHI."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["INFRA_COUNTERS", "Metrics"]

#: Counters of infrastructure ingestion (``phiaudit`` Metrics RPC): records by source kind,
#: records that could not be parsed (kept whole, encrypted), VPC flow header lines skipped,
#: records kept whole in infra_events, records counted in infra_rollups and, of those, the
#: sampled ones also kept whole.
INFRA_COUNTERS = (
    "infra_records_pgaudit", "infra_records_cloudtrail", "infra_records_vpcflow",
    "infra_records_db_span", "infra_records_unknown", "infra_unparsed", "infra_flow_headers",
    "infra_kept_whole", "infra_rolled_up", "infra_sampled",
)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)
