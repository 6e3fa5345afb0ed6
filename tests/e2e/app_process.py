"""The sample application in a process of its own, audited by phiaudit, driven over stdin.

Used by ``test_instrumented_app.py`` to restart the application in the middle of a receiver
outage. Run from the repository root::

    PHIAUDIT_SPOOL_DIR=/tmp/spool python -m tests.e2e.app_process --endpoint 127.0.0.1:4317 \\
        --db /tmp/clinic.db

It configures phiaudit exactly as an application would (``configure`` with the real OTLP
exporter; the spool directory comes from ``PHIAUDIT_SPOOL_DIR``), serves the sample app on
a real HTTP port in a thread, and then reads one command per line from stdin, answering each
with one JSON line on stdout:

* ``traffic N``: ``drive_traffic`` over real HTTP, N rounds; answers the summary and the
  slowest request in seconds;
* ``flush SECONDS``: ``force_flush``; answers whether everything was acknowledged;
* ``pending``: spool segments waiting and spans not yet settled (queued or in flight);
* ``exit``: a clean shutdown (flush to the exporter, else to the spool), exit 0.

The first line written is ``{"ready": true, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "instrumentation") not in sys.path:
    sys.path.insert(0, str(ROOT / "instrumentation"))


def summary_to_json(summary: Any) -> dict[str, Any]:
    return {
        "actions": dict(summary.actions),
        "failures": dict(summary.failures),
        "patient_ids": sorted(summary.patient_ids),
        "non_phi_requests": summary.non_phi_requests,
        "statuses": {str(k): v for k, v in summary.statuses.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from sample import traffic as traffic_mod
    from sample.app import create_app, sample_config
    from werkzeug.serving import make_server

    from phiaudit.instrumentation import configure

    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--exporter-timeout", type=float, default=5.0)
    parser.add_argument("--retry-max", type=float, default=1.0)
    args = parser.parse_args(argv)

    config = sample_config()  # the spool directory: PHIAUDIT_SPOOL_DIR
    config = replace(
        config, delivery=replace(config.delivery, retry_max_seconds=args.retry_max)
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "sample-ehr"}))
    audit = configure(
        OTLPSpanExporter(endpoint=args.endpoint, insecure=True, timeout=args.exporter_timeout),
        config=config,
        tracer_provider=provider,
        strict=True,
    )
    app = create_app(args.db, tracer_provider=provider)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    # time every request: wrap the HTTP client the traffic driver uses
    latencies: list[float] = []
    original_call = traffic_mod._Client.call

    def timed_call(self: Any, method: str, path: str, body: Any = None) -> Any:
        t0 = time.perf_counter()
        try:
            return original_call(self, method, path, body)
        finally:
            latencies.append(time.perf_counter() - t0)

    traffic_mod._Client.call = timed_call  # type: ignore[method-assign]

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    delivery = audit.delivery
    assert delivery is not None
    say({"ready": True, "pid": os.getpid(), "url": base,
         "spool_dir": config.delivery.spool_dir})
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "traffic":
            latencies.clear()
            summary = traffic_mod.drive_traffic(base, rounds=int(rest[0]))
            say({"summary": summary_to_json(summary), "max_latency": max(latencies),
                 "requests": len(latencies)})
        elif cmd == "flush":
            say({"flushed": audit.force_flush(int(float(rest[0]) * 1000))})
        elif cmd == "pending":
            say({"segments": delivery.spool.pending(), "unsettled": delivery._unsettled,
                 "dropped": delivery.dropped})
        elif cmd == "exit":
            server.shutdown()
            provider.shutdown()
            say({"bye": True, "dropped": delivery.dropped})
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
