"""Storage benchmark: CPU per stored audit row (its insert and the merges it causes), by table
variant, on the real embedded engine.

    .venv/bin/python bench/store.py [--requests N] [--block ROWS] [--variant NAME ...]

What it does, in one run:

1. builds realistic ``audit_events`` rows: the requests ``bench/receiver.py`` sends, through
   the service's own ``RequestProcessor`` (the compiled extractor where it is built, else the
   Python path), encrypted and linked into one hash chain, as the writer inserts them;
2. for each variant, in its own process (one chDB engine per process): a fresh engine on an
   AES-256-CTR encrypted disk (as the embedded store), the project's ``audit_events`` DDL
   (``phiaudit.storage.migration_statements``) changed as the variant says, every row inserted
   in blocks of ``--block`` rows (the group commit's size under the receiver bench: 8 clients
   x 512 spans), each block one Arrow stream through chDB's streaming insert as
   ``Store.insert_arrow`` does; then it waits until the merges settle;
3. reports per variant: the process's CPU per row (insert and merges, every thread), insert
   wall time per row, write amplification (sum of rows x merge level over the active parts,
   per row), bytes on disk per row and peak RSS; and its CPU as a ratio to ``before`` (the
   table as it was before the storage tuning), measured in the same run: the ratio survives
   machine noise better than the microseconds do.

Variants: ``current`` (the schema as it is), ``before`` (no CODEC(NONE), the default
merge_selector_base 5 and wide parts from 10 MiB), ``lz4`` (current without the codecs),
``base5`` (current with the default merge selector), ``wide`` (current with the default
wide-part threshold), ``nobloom`` (current without the bloom filter indexes). Writes
``bench/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "store.json"

#: variant -> regular-expression substitutions on the audit_events DDL
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "current": [],
    "before": [(r" CODEC\(NONE\)", ""), (r", merge_selector_base = 64", ""),
               (r", min_bytes_for_wide_part = 268435456", "")],
    "lz4": [(r" CODEC\(NONE\)", "")],
    "base5": [(r", merge_selector_base = 64", "")],
    "base16": [(r"merge_selector_base = 64", "merge_selector_base = 16")],
    "wide": [(r", min_bytes_for_wide_part = 268435456", "")],
    "nobloom": [(r"\n    INDEX idx_\w+ \w+ TYPE bloom_filter[^\n]*", "")],
    "nolc": [(r"LowCardinality\(String\)", "String")],
}


def make_rows(requests: int, out: Path) -> int:
    """The linked audit_events rows of ``requests`` bench requests, as one Arrow IPC file."""
    import pyarrow as pa

    from phiaudit.receiver import DEFAULT_SENSITIVE_ATTRIBUTES, Extractor
    from phiaudit.receiver._fast import native_linker
    from phiaudit.receiver._process import RequestProcessor, native_for
    from phiaudit.storage import (
        AUDIT_COLUMNS,
        ChainState,
        KeyRing,
        RecordEncoder,
        link_arrow,
        unlinked_table,
    )
    from receiver import RequestFactory

    work = Path(tempfile.mkdtemp(prefix="phiaudit-store-rows-"))
    try:
        ring = KeyRing.open(work / "data")
        processor = RequestProcessor(RecordEncoder.for_ring(ring),
                                     Extractor(list(DEFAULT_SENSITIVE_ATTRIBUTES)),
                                     native_for(ring))
        factory = RequestFactory(512)
        tables = []
        for _ in range(requests):
            rows = processor.process("traces", factory.make(), "anonymous").audit_rows
            tables.append(rows if isinstance(rows, pa.Table)
                          else unlinked_table(AUDIT_COLUMNS, rows))
        linked, _, _ = link_arrow(ChainState("bench-store"), pa.concat_tables(tables),
                                  native_linker())
        linked = linked.combine_chunks()
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, linked.schema) as w:
            w.write_table(linked)
        return int(linked.num_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(Path(str(work / "data") + ".keys"), ignore_errors=True)


def variant_worker(name: str, rows_file: Path, block: int, out_file: Path) -> None:
    """One variant in this process: fresh engine, DDL, inserts, merges settled."""
    import chdb
    import pyarrow as pa

    from phiaudit.storage import migration_statements

    rows = pa.ipc.open_file(pa.memory_map(str(rows_file))).read_all()
    work = Path(tempfile.mkdtemp(prefix=f"phiaudit-store-{name}-"))
    try:
        plain = work / "plain"
        plain.mkdir()
        config = work / "config.xml"
        config.write_text(f"""<clickhouse><logger><level>error</level><console>0</console></logger>
<storage_configuration><disks><plain><type>local</type><path>{plain}/</path></plain>
<enc><type>encrypted</type><disk>plain</disk><path>encrypted/</path>
<algorithm>AES_256_CTR</algorithm><key_hex id="1">{"5a" * 32}</key_hex>
<current_key_id>1</current_key_id></enc></disks>
<policies><encp><volumes><main><disk>enc</disk></main></volumes></encp></policies>
</storage_configuration></clickhouse>""")
        conn = chdb.connect(f"{work / 'ch'}?config-file={config}")
        ddl = next(s for s in migration_statements("bench", "encp") if "audit_events (" in s)
        for pattern, replacement in VARIANTS[name]:
            ddl = re.sub(pattern, replacement, ddl)
        conn.query("CREATE DATABASE bench")
        conn.query(ddl)
        columns = ", ".join(f"`{n}`" for n in rows.schema.names)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        insert_s = 0.0
        for i, off in enumerate(range(0, rows.num_rows, block)):
            sink = pa.BufferOutputStream()
            part = rows.slice(off, block)
            with pa.ipc.new_stream(sink, part.schema) as w:
                w.write_table(part)
            payload = sink.getvalue().to_pybytes()
            t = time.monotonic()
            with conn.send_insert(f"INSERT INTO bench.audit_events ({columns}) SETTINGS "
                                  f"insert_deduplication_token = 'b{i}', async_insert = 0",
                                  "ArrowStream") as ins:
                ins.append(payload)
                ins.finish()
            insert_s += time.monotonic() - t
        quiet = 0
        while quiet < 3:  # merges settled: none running in three looks, 0.3 s apart
            running = int(conn.query("SELECT count() FROM system.merges", "CSV").bytes())
            quiet = quiet + 1 if running == 0 else 0
            time.sleep(0.3)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        parts = json.loads(conn.query(
            "SELECT count() AS n_parts, sum(rows) AS n_rows, sum(bytes_on_disk) AS n_bytes, "
            "sum(rows * level) / sum(rows) AS amp FROM system.parts "
            "WHERE database = 'bench' AND table = 'audit_events' AND active",
            "JSONEachRow").bytes())
        conn.close()
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        n = rows.num_rows
        out_file.write_text(json.dumps({
            "variant": name, "rows": n, "block": block, "cpu_us_per_row": cpu / n * 1e6,
            "insert_wall_us_per_row": insert_s / n * 1e6, "wall_s": time.monotonic() - t0,
            "parts": int(parts["n_parts"]), "stored_rows": int(parts["n_rows"]),
            "bytes_per_row": int(parts["n_bytes"]) / max(1, int(parts["n_rows"])),
            "write_amplification": float(parts["amp"]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=800, help="512-span requests (rows)")
    p.add_argument("--block", type=int, default=4096, help="rows per insert")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                   help="repeatable; default: before, current, lz4, base5, wide")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--_variant-worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._variant_worker:
        name, rows_file, block, out = args._variant_worker
        variant_worker(name, Path(rows_file), int(block), Path(out))
        return 0
    variants = args.variant or ["before", "current", "lz4", "base5", "wide"]
    if "before" not in variants:
        variants.insert(0, "before")
    work = Path(tempfile.mkdtemp(prefix="phiaudit-store-bench-"))
    results: list[dict[str, Any]] = []
    try:
        rows_file = work / "rows.arrow"
        t0 = time.monotonic()
        n = make_rows(args.requests, rows_file)
        print(f"{n:,} audit rows ({args.requests} requests of 512 spans) built in "
              f"{time.monotonic() - t0:.1f} s; blocks of {args.block:,} rows")
        for name in variants:
            out = work / f"{name}.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--_variant-worker", name, str(rows_file),
                 str(args.block), str(out)],
                cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(out.read_text()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next(r for r in results if r["variant"] == "before")["cpu_us_per_row"]
    print(f"  {'variant':<9} {'CPU us/row':>10} {'vs before':>9} {'insert us/row':>13} "
          f"{'write amp':>9} {'bytes/row':>9} {'parts':>5} {'peak RSS':>9}")
    for r in results:
        r["cpu_ratio_to_before"] = r["cpu_us_per_row"] / base
        print(f"  {r['variant']:<9} {r['cpu_us_per_row']:10.1f} {r['cpu_ratio_to_before']:9.2f} "
              f"{r['insert_wall_us_per_row']:13.1f} {r['write_amplification']:9.2f} "
              f"{r['bytes_per_row']:9.0f} {r['parts']:5d} {r['peak_rss_mib']:8.0f}M")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
