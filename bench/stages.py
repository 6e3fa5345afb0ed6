"""Per-stage cost of the receiver pipeline, in one process, without gRPC.

    .venv/bin/python bench/stages.py [--spans-per-request S] [--requests N] [--python]

Runs the service's own code on the requests ``bench/receiver.py`` sends and times each stage
separately, single-threaded. Where the compiled extractor is built (and without ``--python``):
protobuf parse (validation), the compiled extraction and encryption, ``link_arrow`` and
``Store.insert_arrow``. The Python path: protobuf parse, extraction (``Extractor.traces``),
record encoding (``RecordEncoder.audit_row``: AES-GCM of the PHI fields, HMAC blind indexes,
JSON of ``extra``),
hash chaining (``link_rows``), the row-to-column transpose, and the chDB insert through
``Store.insert`` (a real embedded store in a temporary directory). Prints microseconds per
span and the spans/s each stage alone would allow; writes ``bench/results/stages.json``.

It answers "where does the time go" without a profiler's overhead; ``bench/receiver.py
--py-spy`` answers it for the running service.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from receiver import SERVICE_BATCH_ROWS, RequestFactory

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spans-per-request", type=int, default=512)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "stages.json"))
    p.add_argument("--python", action="store_true",
                   help="the Python path even where the compiled extractor is built")
    args = p.parse_args(argv)

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

    from phiaudit.receiver import DEFAULT_SENSITIVE_ATTRIBUTES, Extractor
    from phiaudit.storage import (
        AUDIT_COLUMNS,
        ChainState,
        KeyRing,
        RecordEncoder,
        Store,
        StoreLocation,
        canonical_encoder,
        link_rows,
        migrate,
    )

    factory = RequestFactory(args.spans_per_request)
    raws = [factory.make() for _ in range(args.requests)]
    spans = args.spans_per_request * args.requests
    work = Path(tempfile.mkdtemp(prefix="phiaudit-stages-"))
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        out = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    try:
        data_dir = work / "data"
        data_dir.mkdir()
        keys = KeyRing.open(data_dir)
        encoder = RecordEncoder.for_ring(keys)
        extractor = Extractor(list(DEFAULT_SENSITIVE_ATTRIBUTES))
        location = StoreLocation(data_dir=data_dir)
        migrate(location)
        store = Store.open(location)
        [c.name for c in AUDIT_COLUMNS]
        enc = canonical_encoder(AUDIT_COLUMNS)
        state = ChainState("bench-stages")
        batch: list[list[Any]] = []
        inserts = 0
        from phiaudit.receiver import _native  # type: ignore[attr-defined]
        from phiaudit.receiver._fast import NativeTraces, native_available
        from phiaudit.storage import ColumnKeys
        if native_available()[0] and not args.python:
            import pyarrow as pa

            from phiaudit.storage import link_arrow
            native = NativeTraces(ColumnKeys.from_ring(keys))
            link_arrow(ChainState("warm-up"), native.extract(  # pyarrow's first cast: ~0.3 s
                raws[0], "anonymous", time.time_ns() // 1000)[0])
            tables: list[Any] = []
            for i, raw in enumerate(raws):
                timed("1 parse (protobuf, validation)",
                      lambda raw=raw: ts.ExportTraceServiceRequest.FromString(raw))
                # what the service runs instead of 1 (folded into extract there)
                timed("1b validate (compiled, _native.c)",
                      lambda raw=raw: _native.validate_traces(raw))
                got = timed("2 extract+encode (compiled, _native.c)",
                            lambda raw=raw: native.extract(raw, "anonymous",
                                                           time.time_ns() // 1000))
                tables.append(got[0])
                if sum(t.num_rows for t in tables) >= SERVICE_BATCH_ROWS or i == len(raws) - 1:
                    linked, seq, head = timed(
                        "4 chain (link_arrow)",
                        lambda t=tables: link_arrow(state, pa.concat_tables(t)))
                    state.seq, state.head = seq, head
                    timed("5 insert (Store.insert_arrow, chDB)",
                          lambda b=linked, n=inserts: store.insert_arrow(
                              "audit_events", b, f"s-{n}"))
                    inserts += 1
                    tables = []
            raws = []
        for i, raw in enumerate(raws):
            req = timed("1 parse (protobuf)",
                        lambda raw=raw: ts.ExportTraceServiceRequest.FromString(raw))
            ex = timed("2 extract (Extractor.traces)",
                       lambda req=req: extractor.traces(req, "anonymous"))
            rows = timed("3 encode (RecordEncoder.audit_row)",
                         lambda ex=ex: [encoder.audit_row(e) for e in ex.audit])
            batch.extend(rows)
            if len(batch) >= SERVICE_BATCH_ROWS or i == len(raws) - 1:
                seq, head = timed("4 chain (link_rows)",
                                  lambda b=batch: link_rows(state, AUDIT_COLUMNS, b, enc,
                                                            [r[-1] for r in b]))
                state.seq, state.head = seq, head
                timed("5 insert (Store.insert_rows: Arrow, chDB)",
                      lambda b=batch, n=inserts: store.insert_rows(
                          "audit_events", AUDIT_COLUMNS, b, f"s-{n}"))
                inserts += 1
                batch = []
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(Path(str(work / "data") + ".keys"), ignore_errors=True)

    total = sum(timings.values())
    print(f"{spans:,} PHI spans, {args.requests} requests of {args.spans_per_request}, "
          f"{inserts} inserts, one thread")
    print(f"  {'stage':<38} {'us/span':>8} {'share':>6} {'alone spans/s':>14}")
    out: dict[str, Any] = {"spans": spans, "inserts": inserts, "stages": {}}
    for name, secs in sorted(timings.items()):
        us = secs / spans * 1e6
        print(f"  {name:<38} {us:8.2f} {secs / total:6.1%} {spans / secs:14,.0f}")
        out["stages"][name] = {"us_per_span": us, "share": secs / total,
                               "spans_per_s": spans / secs}
    print(f"  {'total (serial)':<38} {total / spans * 1e6:8.2f} {'':>6} {spans / total:14,.0f}")
    out["total_spans_per_s"] = spans / total
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
