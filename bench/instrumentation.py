"""Instrumentation benchmark: CPU per request of the sample application, with and without
phiaudit, measured in the same run.

Run it from the repository root::

    .venv/bin/python bench/instrumentation.py [--blocks N] [--rounds R] [--exporter otlp|memory]
                                              [--profile FILE]

What it compares (same sample app, same ``drive_traffic`` requests through Flask's test client,
same SDK, same exporter type for every span pipeline):

* ``otel`` (the baseline): the application as it is before phiaudit, already instrumented
  with OpenTelemetry (Flask and sqlite3 instrumentations, ``ParentBased(ALWAYS_ON)``), its
  spans going through a ``BatchSpanProcessor`` to an exporter;
* ``phiaudit``: the same plus ``phiaudit.instrumentation.configure(exporter, ...)`` with the
  sample's configuration; the application's own pipeline is wrapped in ``without_phi`` (as
  documented), so PHI spans leave through phiaudit's delivery (spool on disk, fsync on) and
  the other spans through the usual processor;
* ``bare`` (context only): no OpenTelemetry at all.

Exporter (``--exporter``): by default the real ``OTLPSpanExporter`` pointed at a real
``phiaudit serve`` started here, for every variant. That is what the application pays in
production: phiaudit changes how spans are exported (its own path, more attributes per
span), so an in-memory exporter would hide part of the added cost (protobuf encoding, gRPC).
``--exporter memory`` uses the SDK's ``InMemorySpanExporter`` for both, which isolates the
in-process work (classification, tagging, queueing) from export. With the OTLP exporter,
phiaudit's delivery encodes audit spans with its own lean encoder and hands the bytes to the
same ``OTLPSpanExporter`` (the baseline's spans go through the SDK's encoder); with any other
exporter it passes ``ReadableSpan`` objects, as the baseline does.

How it measures: each variant runs in a long-lived worker process of its own (no global
OpenTelemetry state shared, one data directory each). A block is R rounds of the sample
traffic followed by a flush of every span processor (so the export work a block caused is
counted in that block); its cost is the worker's ``time.process_time()`` delta (all threads:
the request thread and the exporter/delivery threads) divided by the requests sent. Blocks
are interleaved A/B/C with a rotating order, and the ratio phiaudit/otel is taken per pair of
adjacent blocks, so machine noise and drift cancel; the result is the median ratio.

Target: at most 10% added CPU per request (median ratio <= 1.10). Printed as PASS/MISS,
never asserted; results go to ``bench/results/instrumentation.json``. ``--profile FILE``
also runs a block of the phiaudit worker under cProfile (request thread) and writes the
stats, with the top phiaudit functions printed. ``--previous DIR`` adds a fourth worker whose
``phiaudit.instrumentation`` comes from ``DIR/phiaudit/instrumentation/`` (put first on its
``PYTHONPATH``), interleaved with the others: a before/after comparison in the same run, e.g.::

    mkdir -p /tmp/prev && git archive HEAD~1 instrumentation/src/phiaudit/instrumentation \
        | tar -x -C /tmp/prev --strip-components=2 && .venv/bin/python bench/instrumentation.py \
        --previous /tmp/prev
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "instrumentation.json"
VARIANTS = ("otel", "phiaudit", "bare")
TARGET_ADDED = 0.10


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PHIAUDIT_", "OTEL_"))}


# ------------------------------------------------------------------------------------------
# worker: one variant of the application, driven over stdin/stdout (one JSON line each)
# ------------------------------------------------------------------------------------------
def worker(variant: str, endpoint: str | None, workdir: Path) -> int:
    sys.path.insert(0, str(ROOT / "instrumentation"))
    import logging

    from sample.app import create_app, sample_config  # type: ignore[import-not-found]
    from sample.traffic import drive_traffic  # type: ignore[import-not-found]

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    provider: Any = None
    audit: Any = None
    memory: list[Any] = []

    def exporter() -> Any:
        if endpoint is None:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            exp = InMemorySpanExporter()
            memory.append(exp)
            return exp
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=True)

    if variant != "bare":
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": f"bench-{variant}"}))
        general: Any = BatchSpanProcessor(exporter())
        if variant == "phiaudit":
            from phiaudit.instrumentation import configure, without_phi

            config = sample_config()
            config = replace(config, delivery=replace(config.delivery,
                                                      spool_dir=str(workdir / "spool")))
            audit = configure(exporter(), config=config, tracer_provider=provider, strict=True)
            general = without_phi(general, audit.classifier)
        provider.add_span_processor(general)
    app = create_app(workdir / "clinic.db", instrument=variant != "bare",
                     tracer_provider=provider)
    client = app.test_client()

    import threading

    def thread_cpu() -> dict[str, float]:
        out: dict[str, float] = {}
        for t in threading.enumerate():
            try:
                clock = time.pthread_getcpuclockid(t.ident)  # type: ignore[arg-type]
                if t is threading.main_thread():
                    name = "main"
                elif t.name.startswith("phiaudit"):  # phiaudit-intake, phiaudit-sender
                    name = t.name
                else:
                    name = t.name.split("-")[0]
                out[name] = out.get(name, 0.0) + time.clock_gettime(clock)
            except (OSError, TypeError, ValueError):  # a thread that just ended
                pass
        return out

    def block(rounds: int) -> dict[str, Any]:
        threads0 = thread_cpu()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        summary = drive_traffic(client, rounds=rounds)
        flushed = provider.force_flush(60000) if provider is not None else True
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        threads1 = thread_cpu()
        by_thread = {k: v - threads0.get(k, 0.0) for k, v in threads1.items()}
        by_thread["other (C threads: gRPC)"] = cpu - sum(by_thread.values())
        for exp in memory:
            exp.clear()
        requests = sum(summary.statuses.values())
        return {"cpu": cpu, "wall": wall, "requests": requests, "flushed": flushed,
                "threads": by_thread}

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "run":
            say(block(int(rest[0])))
        elif cmd == "profile":
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            result = block(int(rest[0]))
            prof.disable()
            prof.dump_stats(rest[1])
            say(result)
        elif cmd == "stats":
            delivery = audit.delivery if audit is not None else None
            say({"dropped": delivery.dropped if delivery is not None else 0,
                 "spooled": delivery.spooled if delivery is not None else 0,
                 "spool_segments": delivery.spool.pending() if delivery is not None else 0})
        elif cmd == "exit":
            if provider is not None:
                provider.shutdown()
            say({"bye": True})
            return 0
    return 0


class Worker:
    def __init__(self, variant: str, endpoint: str | None, workdir: Path,
                 pythonpath: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        kind = "phiaudit" if variant == "previous" else variant
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
               "--workdir", str(workdir)]
        if endpoint:
            cmd += ["--endpoint", endpoint]
        env = _clean_env()
        if pythonpath:  # imported before the installed phiaudit.instrumentation
            env["PYTHONPATH"] = pythonpath
        self.variant = variant
        self._log = open(workdir / "worker.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env, cwd=ROOT)
        assert self._read().get("ready")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} exited ({self.proc.poll()})")
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.ask("exit")
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


# ------------------------------------------------------------------------------------------
# the receiver
# ------------------------------------------------------------------------------------------
def start_receiver(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    run_file = data_dir / "run" / "service.json"
    log = open(data_dir.parent / "service.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "phiaudit.receiver", "serve", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT, env=_clean_env(),
        cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}")
        try:
            info = json.loads(run_file.read_text())
            if info.get("pid") == proc.pid:
                return proc, str(info["address"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the service did not start within 120 s")


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count()}


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40, help="measured blocks per variant")
    parser.add_argument("--rounds", type=int, default=5, help="traffic rounds per block")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured blocks per variant")
    parser.add_argument("--exporter", choices=("otlp", "memory"), default="otlp")
    parser.add_argument("--profile", default=None, help="cProfile stats file (phiaudit worker)")
    parser.add_argument(
        "--previous", metavar="DIR", default=None,
        help="also run phiaudit with phiaudit/instrumentation/ imported from DIR (e.g. the "
             "files of an older commit), interleaved: before/after in the same run")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.endpoint, Path(args.workdir))

    tmp = Path(tempfile.mkdtemp(prefix="phiaudit-bench-instr-"))
    receiver = None
    workers: dict[str, Worker] = {}
    try:
        endpoint = None
        if args.exporter == "otlp":
            receiver, endpoint = start_receiver(tmp / "data")
        variants = VARIANTS + (("previous",) if args.previous else ())
        workers = {v: Worker(v, endpoint, tmp / v,
                             str(Path(args.previous).resolve()) if v == "previous" else None)
                   for v in variants}
        for _ in range(args.warmup):
            for w in workers.values():
                w.ask(f"run {args.rounds}")
        per_request: dict[str, list[float]] = {v: [] for v in variants}
        threads: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        ratios: list[float] = []
        previous_ratios: list[float] = []
        otel_vs_bare: list[float] = []
        unflushed = 0
        requests_per_block = 0
        for i in range(args.blocks):
            n = len(variants)
            order = variants[i % n:] + variants[:i % n]  # rotate: no variant always first
            got = {}
            for v in order:
                got[v] = workers[v].ask(f"run {args.rounds}")
                unflushed += not got[v]["flushed"]
                requests_per_block = got[v]["requests"]
                per_request[v].append(got[v]["cpu"] / got[v]["requests"])
                for name, sec in got[v]["threads"].items():
                    threads[v].setdefault(name, []).append(sec / got[v]["requests"])
            ratios.append(per_request["phiaudit"][-1] / per_request["otel"][-1])
            otel_vs_bare.append(per_request["otel"][-1] / per_request["bare"][-1])
            if args.previous:
                previous_ratios.append(per_request["previous"][-1] / per_request["otel"][-1])
        stats = workers["phiaudit"].ask("stats")
        profile_top: list[str] = []
        if args.profile:
            workers["phiaudit"].ask(f"profile {args.rounds * 4} {Path(args.profile).resolve()}")
            profile_top = _profile_summary(Path(args.profile).resolve())
    finally:
        for w in workers.values():
            try:
                w.close()
            except Exception as exc:  # a broken worker must not hide the results
                print(f"worker {w.variant}: {type(exc).__name__}", file=sys.stderr)
        if receiver is not None:
            receiver.terminate()
            try:
                receiver.wait(60)
            except subprocess.TimeoutExpired:
                receiver.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    median_ratio = statistics.median(ratios)
    added = median_ratio - 1
    verdict = "PASS" if added <= TARGET_ADDED else "MISS"
    q1, q3 = _quartiles(ratios)
    us = {v: statistics.median(per_request[v]) * 1e6 for v in variants}
    us_threads = {v: {name: round(statistics.median(vals) * 1e6, 1)
                      for name, vals in sorted(threads[v].items())} for v in variants}
    result = {
        "benchmark": "instrumentation",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "exporter": args.exporter,
        "blocks": args.blocks,
        "rounds_per_block": args.rounds,
        "requests_per_block": requests_per_block,
        "cpu_us_per_request_median": us,
        "cpu_us_per_request_by_thread_median": us_threads,
        "ratio_phiaudit_over_otel": {"median": median_ratio, "q1": q1, "q3": q3,
                                     "min": min(ratios), "max": max(ratios)},
        "added_cpu_per_request": added,
        "ratio_otel_over_bare_median": statistics.median(otel_vs_bare),
        "target_added": TARGET_ADDED,
        "verdict": verdict,
        "unflushed_blocks": unflushed,
        "phiaudit_dropped": stats["dropped"],
        "phiaudit_spooled": stats["spooled"],
        "phiaudit_spool_segments_left": stats["spool_segments"],
        "profile_top": profile_top,
    }
    if previous_ratios:
        p1, p3 = _quartiles(previous_ratios)
        result["previous"] = args.previous
        result["ratio_previous_over_otel"] = {"median": statistics.median(previous_ratios),
                                              "q1": p1, "q3": p3}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(f"instrumentation CPU per request ({args.exporter} exporter, {args.blocks} blocks x "
          f"{requests_per_block} requests, interleaved)")
    for v in variants:
        split = ", ".join(f"{k} {t:.0f}" for k, t in us_threads[v].items())
        print(f"  {v:9s} {us[v]:8.1f} us/request (median)   by thread: {split}")
    print(f"  phiaudit/otel  median {median_ratio:.3f}  (IQR {q1:.3f}-{q3:.3f})  "
          f"added {added * 100:+.1f}%  target <= {TARGET_ADDED * 100:.0f}%  {verdict}")
    if previous_ratios:
        p1, p3 = _quartiles(previous_ratios)
        print(f"  previous/otel  median {statistics.median(previous_ratios):.3f}  "
              f"(IQR {p1:.3f}-{p3:.3f})  ({args.previous})")
    print(f"  otel/bare      median {statistics.median(otel_vs_bare):.3f}  (context)")
    print(f"  dropped {stats['dropped']}, spooled {stats['spooled']}, "
          f"unflushed blocks {unflushed}")
    for line in profile_top:
        print("  " + line)
    print(f"  -> {RESULTS.relative_to(ROOT)}")
    return 0


def _profile_summary(path: Path, top: int = 15) -> list[str]:
    """The phiaudit functions with the most cumulative time, as short lines."""
    import pstats

    st = pstats.Stats(str(path))
    total = st.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if "phiaudit/instrumentation" in file:
            rows.append((ct, tt, nc, f"{Path(file).name}:{line}:{func}"))
    rows.sort(reverse=True)
    return [f"{name:55s} calls {nc:6d}  cum {ct / total * 100:5.1f}%  self {tt / total * 100:5.1f}%"
            for ct, tt, nc, name in rows[:top]]


if __name__ == "__main__":
    sys.exit(main())
