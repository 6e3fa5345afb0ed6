"""Receiver benchmark: sustained PHI spans/s through real gRPC into the embedded store.

Run it from the repository root::

    .venv/bin/python bench/receiver.py [--seconds N] [--clients C] [--spans-per-request S]

What it does, in one run:

1. starts ``phiaudit serve`` as a subprocess (temporary data directory, ``--listen
   127.0.0.1:0``; the address is read from ``DATA_DIR/run/service.json``), exactly as users run
   it: every request is answered OK only after its rows are committed to chDB;
2. builds realistic ``ExportTraceServiceRequest`` protobufs, every span a PHI audit span with
   the contract attributes (CONTRACT.md section 1), and pre-serializes all of them before the
   clock starts. Every request has its own trace and span ids: the service deduplicates
   identical request bytes, so re-sending one request would measure nothing;
3. drives the service from C client threads, each on its own raw gRPC channel calling
   ``/opentelemetry.proto.collector.trace.v1.TraceService/Export`` on bytes, for a warm-up and
   then ``--seconds`` of measurement; an UNAVAILABLE answer is counted and the same bytes are
   re-sent after the RetryInfo delay (as an OTLP exporter does), so a request counts once, when
   it is acknowledged; latency is first attempt to OK;
4. measures the ceiling in the same run, in a separate process (one chDB engine per process):
   protobuf parse of the same requests plus a column-oriented clickhouse-connect insert of as
   many rows into a real ``audit_events`` table (the project's own DDL, same columns and types),
   in batches of the service's size, on one thread;
5. prints a compact table and writes ``bench/results/receiver.json``.

Targets are printed as PASS/MISS, never asserted (STYLE.md: speed is measured here, as a ratio
against a baseline of the same run, never as a timed assertion in the test suite).

``--py-spy FILE`` runs the service under ``py-spy record`` (``pip install py-spy``) and writes a
flame graph (SVG) or, with a ``.txt`` name, collapsed stacks, for finding where the time goes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "receiver.json"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

TARGET_SPANS_PER_S = 50_000
TARGET_P99_S = 1.0
TARGET_RSS_BYTES = 1 << 30

# the service's default group-commit size (ServiceConfig.batch_max_rows)
SERVICE_BATCH_ROWS = 10_000


# ------------------------------------------------------------------------------------------
# request generation
# ------------------------------------------------------------------------------------------

_ACTIONS = [  # (action, method, route, resource type, weight)
    ("read", "GET", "/fhir/Patient/{id}", "Patient", 40),
    ("read", "GET", "/fhir/Observation/{id}", "Observation", 20),
    ("search", "GET", "/fhir/Observation", "Observation", 15),
    ("update", "PUT", "/fhir/Patient/{id}", "Patient", 8),
    ("create", "POST", "/fhir/Encounter", "Encounter", 8),
    ("read", "GET", "/fhir/MedicationRequest/{id}", "MedicationRequest", 7),
    ("disclose", "POST", "/api/referrals/{id}/send", "DocumentReference", 2),
]
_ROLES = [["physician"], ["nurse"], ["physician", "attending"], ["billing"], ["front-desk"]]
_PURPOSE = ["TREAT", "TREAT", "TREAT", "HPAYMT", "HOPERAT"]
_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36",
    "EpicHaiku/10.2 (iPhone; iOS 17.5)",
    "python-httpx/0.27.0",
]
_SERVICES = ["ehr-api", "fhir-gateway", "scheduling", "billing-api"]


def _kv(key: str, value: Any) -> Any:
    from opentelemetry.proto.common.v1 import common_pb2 as c

    av = c.AnyValue()
    if isinstance(value, bool):
        av.bool_value = value
    elif isinstance(value, int):
        av.int_value = value
    elif isinstance(value, list):
        av.array_value.values.extend(c.AnyValue(string_value=str(v)) for v in value)
    else:
        av.string_value = str(value)
    return c.KeyValue(key=key, value=av)


def _template(rng: random.Random, spans: int, seq: int
              ) -> tuple[bytes, list[bytes], list[bytes], int]:
    """One serialized request; returns (bytes, the trace ids, the span ids it contains, the
    clock reading its span times are relative to)."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
    from opentelemetry.proto.trace.v1 import trace_pb2 as tr

    req = ts.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    service = _SERVICES[seq % len(_SERVICES)]
    rs.resource.attributes.extend([
        _kv("service.name", service), _kv("service.version", "4.12.1"),
        _kv("service.instance.id", str(uuid.UUID(int=rng.getrandbits(128)))),
        _kv("host.name", f"{service}-{seq % 3}.prod.internal"),
        _kv("deployment.environment.name", "production"),
        _kv("telemetry.sdk.name", "opentelemetry"), _kv("telemetry.sdk.language", "python"),
        _kv("telemetry.sdk.version", "1.45.0"),
    ])
    ss = rs.scope_spans.add()
    ss.scope.name = "phiaudit.instrumentation"
    ss.scope.version = "0.1.0"
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    now = time.time_ns()
    weights = [a[4] for a in _ACTIONS]
    trace_id = b""
    parent = b""
    for i in range(spans):
        if i % 4 == 0:  # a few spans per trace, the later ones children of the first
            trace_id = rng.randbytes(16)
            trace_ids.append(trace_id)
            parent = b""
        span_id = rng.randbytes(8)
        span_ids.append(span_id)
        action, method, route, rtype, _ = rng.choices(_ACTIONS, weights)[0]
        rid = f"{rng.randrange(10**7, 10**8)}"
        patient = f"pat-{rng.randrange(10**6, 10**7)}"
        failed = rng.random() < 0.03
        start = now - rng.randrange(1_000_000_000, 5_000_000_000)
        span = ss.spans.add(
            trace_id=trace_id, span_id=span_id, parent_span_id=parent,
            name=f"{method} {route}", kind=tr.Span.SPAN_KIND_SERVER,
            start_time_unix_nano=start, end_time_unix_nano=start + rng.randrange(2, 80) * 10**6,
        )
        if not parent:
            parent = span_id
        user = f"u{rng.randrange(1000, 9999)}@hospital.example.org"
        attrs = [
            ("phi.audit.event", True), ("phi.audit.action", action),
            ("phi.resource.type", rtype), ("phi.resource.id", rid), ("phi.patient.id", patient),
            ("phi.purpose", rng.choice(_PURPOSE)), ("phi.actor.type", "user"),
            ("enduser.id", user), ("user.roles", rng.choice(_ROLES)),
            ("client.address", f"10.{rng.randrange(256)}.{rng.randrange(256)}."
                               f"{rng.randrange(1, 255)}"),
            ("user_agent.original", rng.choice(_AGENTS)),
            ("http.request.method", method), ("http.route", route),
            ("http.response.status_code", 403 if failed else 200),
            ("url.path", route.replace("{id}", rid)), ("url.scheme", "https"),
            ("server.address", "ehr.hospital.example.org"), ("network.protocol.version", "1.1"),
        ]
        if action == "search":
            attrs += [("phi.query", f"patient=Patient/{patient}&category=vital-signs&_count=50"),
                      ("phi.record.count", rng.randrange(1, 50))]
        if action == "disclose":
            attrs += [("phi.disclosure.recipient", "Springfield Cardiology Associates")]
        span.attributes.extend(_kv(k, v) for k, v in attrs)
        if failed:
            span.status.code = tr.Status.STATUS_CODE_ERROR
    return req.SerializeToString(), trace_ids, span_ids, now


class RequestFactory:
    """Unique requests, fast: a few protobuf templates whose id bytes are rewritten in place.

    Trace, span and parent-span ids are fixed-width ``bytes`` fields, so each new request is the
    template with fresh random bytes at every id position: byte-identical to what protobuf
    would serialize for those ids, at a tiny fraction of the cost.

    Span start and end times are ``fixed64`` fields, rewritten the same way by :meth:`stamp`
    when a request is sent, so the spans of a long run are spread over it as a real
    application's are (the rule engine's windows then hold a window's worth of events, not
    everything sent since the start).
    """

    def __init__(self, spans: int, templates: int = 8, seed: int = 20240601) -> None:
        rng = random.Random(seed)
        self.spans = spans
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

        self._tpl: list[tuple[np.ndarray, list[np.ndarray], np.ndarray]] = []
        self._times: list[tuple[np.ndarray, int]] = []
        for t in range(templates):
            raw, trace_ids, span_ids, base_ns = _template(rng, spans, t)
            # the byte positions of every span's start (field 7) and end (field 8) time
            tpos = []
            req = ts.ExportTraceServiceRequest.FromString(raw)
            for span in (s for r in req.resource_spans for sc in r.scope_spans for s in sc.spans):
                for tag, value in ((0x39, span.start_time_unix_nano),
                                   (0x41, span.end_time_unix_nano)):
                    at = raw.find(bytes([tag]) + value.to_bytes(8, "little"))
                    assert at >= 0, "span time not found in its template"
                    tpos.append(at + 1)
            self._times.append((np.array(tpos, dtype=np.int64)[:, None] + np.arange(8), base_ns))
            pos_all: list[tuple[int, int, int]] = []
            slot = 0
            for ident in trace_ids + span_ids:
                start = 0
                while (at := raw.find(ident, start)) >= 0:
                    pos_all.append((at, len(ident), slot))
                    start = at + 1
                slot += 1
            # per id width: (n_occurrences, width) matrix of byte positions + their slot
            groups = []
            for width in (16, 8):
                rows = [(p, s) for p, w, s in pos_all if w == width]
                pos = np.array([p for p, _ in rows], dtype=np.int64)[:, None] + np.arange(width)
                slots = np.array([s for _, s in rows], dtype=np.int64)
                groups.append((pos, slots, width))
            self._tpl.append((np.frombuffer(raw, dtype=np.uint8), groups, np.int64(slot)))
        self._np = np.random.default_rng(seed)
        self._n = 0
        self._lock = threading.Lock()

    def make(self) -> bytes:
        return self.make_item()[1]

    def make_item(self) -> tuple[int, bytes]:
        """A new request and the template it was made from (for :meth:`stamp`)."""
        with self._lock:
            k = self._n % len(self._tpl)
            self._n += 1
            fresh = self._np.integers(0, 256, size=(int(self._tpl[k][2]), 16), dtype=np.uint8)
        buf = self._tpl[k][0].copy()
        for pos, slots, width in self._tpl[k][1]:
            buf[pos] = fresh[slots, :width]
        return k, buf.tobytes()

    def stamp(self, k: int, raw: bytes, now_ns: int) -> bytes:
        """``raw`` (made from template ``k``) with its span times moved to end near ``now_ns``,
        as they were relative to the template's making."""
        pos, base_ns = self._times[k]
        buf = np.frombuffer(raw, dtype=np.uint8).copy()
        times = buf[pos].view("<u8")  # (spans * 2, 1): a copy of the times, little-endian
        times += np.uint64(max(0, now_ns - base_ns))
        buf[pos] = times.view(np.uint8).reshape(pos.shape)
        return buf.tobytes()


def _check_factory(factory: RequestFactory) -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

    a, b = factory.make(), factory.make()
    ra = ts.ExportTraceServiceRequest.FromString(a)
    spans = [s for r in ra.resource_spans for sc in r.scope_spans for s in sc.spans]
    assert len(spans) == factory.spans
    assert len({s.span_id for s in spans}) == len(spans), "span ids must be unique"
    assert all(s.parent_span_id in {x.span_id for x in spans} | {b""} for s in spans)
    assert a != b
    # stamping moves every span time by the same amount and changes nothing else
    k, c = factory.make_item()
    later = time.time_ns() + 3600 * 10**9
    moved = ts.ExportTraceServiceRequest.FromString(factory.stamp(k, c, later))
    orig = ts.ExportTraceServiceRequest.FromString(c)
    shifts = set()
    for r_orig, r_moved in zip(orig.resource_spans, moved.resource_spans, strict=True):
        for s_orig, s_moved in zip(r_orig.scope_spans[0].spans, r_moved.scope_spans[0].spans,
                                   strict=True):
            shifts.add(s_moved.start_time_unix_nano - s_orig.start_time_unix_nano)
            shifts.add(s_moved.end_time_unix_nano - s_orig.end_time_unix_nano)
            s_moved.start_time_unix_nano = s_orig.start_time_unix_nano
            s_moved.end_time_unix_nano = s_orig.end_time_unix_nano
    assert len(shifts) == 1 and 3500 * 10**9 < shifts.pop() < 3700 * 10**9
    assert moved == orig


# ------------------------------------------------------------------------------------------
# the service
# ------------------------------------------------------------------------------------------

def _host_cpu() -> list[int]:
    """The machine's CPU time counters (``cpu`` line of /proc/stat: user nice system idle
    iowait irq softirq steal), in clock ticks."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    return [int(v) for v in fields] + [0] * (8 - len(fields))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PHIAUDIT_", "OTEL_"))}


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    pid: int
    address: str
    data_dir: Path
    log_path: Path

    def status(self, field_name: str) -> int:
        """A /proc/PID/status size field (VmHWM, VmRSS), in bytes."""
        return self.statuses(field_name)[field_name]

    def statuses(self, *names: str) -> dict[str, int]:
        """Several /proc/PID/status size fields from one read, in bytes (0 when missing)."""
        out = dict.fromkeys(names, 0)
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return out

    def cpu_seconds(self) -> float:
        try:
            parts = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def metrics(self) -> dict[str, int]:
        import grpc

        with grpc.insecure_channel(self.address) as ch:
            raw = ch.unary_unary("/phiaudit.v1.Query/Metrics")(b"{}", timeout=30)
        out: dict[str, int] = json.loads(raw)
        return out

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            if self.proc.pid != self.pid:  # under py-spy: let it write its output
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(data_dir: Path, py_spy: str | None,
                  settings: dict[str, Any] | None = None) -> Service:
    data_dir.mkdir(parents=True, exist_ok=True)
    run_file = data_dir / "run" / "service.json"
    log_path = data_dir.parent / "service.log"
    cmd = [sys.executable, "-m", "phiaudit.receiver", "serve", "--data-dir", str(data_dir),
           "--listen", "127.0.0.1:0"]
    if settings:
        config = data_dir.parent / "service.yaml"
        config.write_text(json.dumps(settings))  # JSON is YAML
        cmd += ["--config", str(config)]
    if py_spy:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        fmt = "raw" if py_spy.endswith(".txt") else "flamegraph"
        cmd = [spy, "record", "--rate", "97", "--format", fmt, "--output",
               str(Path(py_spy).resolve()), "--threads", "--", *cmd]
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(),
                            cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            info = json.loads(run_file.read_text())
            return Service(proc, int(info["pid"]), info["address"], data_dir, log_path)
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the service did not start within 120 s")


# ------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------

class RssSampler:
    """The service's resident set every ``interval`` s, from another thread: the sample with the
    highest VmRSS, split into anonymous and file-backed memory (VmHWM gives only the total),
    and when it was."""

    def __init__(self, svc: Service, interval: float = 0.1) -> None:
        self._svc, self._interval = svc, interval
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self.peak: dict[str, float] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "at_s": 0}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            got = self._svc.statuses("VmRSS", "RssAnon", "RssFile")
            if got["VmRSS"] > self.peak["VmRSS"]:
                self.peak = {**got, "at_s": round(time.monotonic() - self._t0, 1)}

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


@dataclass
class Load:
    acked_requests: int = 0
    acked_spans: int = 0
    latencies: list[float] = field(default_factory=list)
    unavailable: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (t, acked spans)


class Pool:
    """Pre-serialized requests handed out once each, their span times set as they are handed
    out; made on demand if it runs dry."""

    def __init__(self, factory: RequestFactory, count: int) -> None:
        self._factory = factory
        self._items = [factory.make_item() for _ in range(count)]
        self._i = 0
        self._lock = threading.Lock()
        self.made_during_run = 0

    def __len__(self) -> int:
        return len(self._items)

    def take(self) -> bytes:
        with self._lock:
            if self._i < len(self._items):
                k, raw = self._items[self._i]
                self._items[self._i] = (0, b"")  # release memory as we go
                self._i += 1
            else:
                self.made_during_run += 1
                raw = b""
        if not raw:
            k, raw = self._factory.make_item()
        return self._factory.stamp(k, raw, time.time_ns())

    def sample(self, n: int) -> list[bytes]:
        with self._lock:
            return [b for _, b in self._items[-n:] if b]


def _retry_delay(exc: Any) -> float:
    for key, value in exc.trailing_metadata() or ():
        if key == "google.rpc.retryinfo-bin":
            from google.rpc import error_details_pb2

            info = error_details_pb2.RetryInfo.FromString(value)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return 1.0


def drive(address: str, pool: Pool, clients: int, seconds: float, spans: int,
          label: str) -> tuple[Load, float]:
    import grpc

    load = Load()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    started = time.monotonic()

    def client(n: int) -> None:
        opts = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.use_local_subchannel_pool", 1), ("grpc.primary_user_agent", f"bench/{n}")]
        with grpc.insecure_channel(address, options=opts) as channel:
            export = channel.unary_unary(EXPORT)
            while time.monotonic() < stop_at:
                raw = pool.take()
                t0 = time.perf_counter()
                while True:
                    try:
                        export(raw, timeout=30)
                        break
                    except grpc.RpcError as exc:
                        code = exc.code()
                        with lock:
                            if code == grpc.StatusCode.UNAVAILABLE:
                                load.unavailable += 1
                            else:
                                load.other_errors[code.name] = \
                                    load.other_errors.get(code.name, 0) + 1
                        if code not in (grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                            raw = b""
                            break
                        time.sleep(min(_retry_delay(exc), 5.0) * random.uniform(0.8, 1.2))
                if not raw:
                    continue
                dt_s = time.perf_counter() - t0
                with lock:
                    load.acked_requests += 1
                    load.acked_spans += spans
                    load.latencies.append(dt_s)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        with lock:
            load.timeline.append((round(time.monotonic() - started, 2), load.acked_spans))
        if label and sys.stdout.isatty():
            print(f"\r  {label}: {time.monotonic() - started:5.1f} s, "
                  f"{load.acked_spans:>9,} spans acked", end="", flush=True)
    if label:
        print(f"\r  {label}: {time.monotonic() - started:5.1f} s, "
              f"{load.acked_spans:>9,} spans acked")
    for t in threads:
        t.join()
    return load, time.monotonic() - started


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# ------------------------------------------------------------------------------------------
# the ceiling (separate process: one chDB engine per process)
# ------------------------------------------------------------------------------------------

def _audit_columns_data(n: int, rng: random.Random) -> tuple[list[str], list[list[Any]]]:
    """Column-oriented data shaped like the service's audit_events rows (sizes included)."""
    from phiaudit.storage import AUDIT_COLUMNS

    now_us = time.time_ns() // 1000

    def blob(plain: int) -> bytes:  # FieldCipher layout: 33-byte header + text + 16-byte tag
        return rng.randbytes(33 + plain + 16)

    def hx(k: int) -> str:
        return rng.randbytes(k).hex()

    gen: dict[str, Any] = {
        "event_id": lambda i: uuid.UUID(int=rng.getrandbits(128)),
        "event_time": lambda i: now_us - rng.randrange(10**7),
        "received_time": lambda i: now_us,
        "time_source": lambda i: "span", "source": lambda i: "span",
        "action": lambda i: rng.choice(["read", "search", "update", "create"]),
        "outcome": lambda i: "success", "outcome_reason": lambda i: "default",
        "actor_id": lambda i: f"u{rng.randrange(1000, 9999)}@hospital.example.org",
        "actor_type": lambda i: "user", "actor_roles": lambda i: rng.choice(_ROLES),
        "service_name": lambda i: rng.choice(_SERVICES), "host_name": lambda i: "ehr-api-1",
        "resource_type": lambda i: "Patient", "resource_id": lambda i: blob(8),
        "resource_bidx": lambda i: hx(16), "patient_id": lambda i: blob(11),
        "patient_bidx": lambda i: hx(16), "record_count": lambda i: 0,
        "query": lambda i: b"", "purpose": lambda i: "TREAT", "recipient": lambda i: b"",
        "client_address": lambda i: blob(12), "client_bidx": lambda i: hx(16),
        "user_agent": lambda i: rng.choice(_AGENTS), "device_id": lambda i: b"",
        "http_method": lambda i: "GET", "http_route": lambda i: "/fhir/Patient/{id}",
        "http_status": lambda i: 200, "trace_id": lambda i: hx(16), "span_id": lambda i: hx(8),
        "sender": lambda i: "anonymous", "extra": lambda i: blob(160),
        "key_id": lambda i: 1, "writer_id": lambda i: "bench-ceiling", "seq": lambda i: i + 1,
        "prev_hash": lambda i: rng.randbytes(32), "hash": lambda i: rng.randbytes(32),
    }
    names = [c.name for c in AUDIT_COLUMNS]
    missing = [n_ for n_ in names if n_ not in gen]
    if missing:  # the schema grew: fill new columns with empty strings of the right kind
        for m in missing:
            gen[m] = lambda i: ""
    return names, [[gen[name](i) for i in range(n)] for name in names]


def ceiling_worker(sample_file: Path, seconds: float, out_file: Path) -> None:
    """Parse the requests and insert as many audit_events rows, batch by batch, one thread."""
    import clickhouse_connect
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

    from phiaudit.storage import migration_statements

    blob = sample_file.read_bytes()
    requests: list[bytes] = []
    off = 0
    while off < len(blob):
        (n,) = struct.unpack_from("<I", blob, off)
        requests.append(blob[off + 4: off + 4 + n])
        off += 4 + n
    db_dir = sample_file.parent / "ceiling-chdb"
    client = clickhouse_connect.get_client(dsn=f"chdb://{db_dir}")
    for stmt in migration_statements("bench"):
        client.command(stmt)
    rng = random.Random(7)
    cap = SERVICE_BATCH_ROWS + 2048
    names, columns = _audit_columns_data(cap, rng)
    settings = {"async_insert": 0}

    parse_s = insert_s = 0.0
    spans = inserts = 0
    arrow_rows = 0
    arrow_s = 0.0
    t_end = time.monotonic() + seconds
    i = 0
    pending = 0
    while time.monotonic() < t_end or pending:
        raw = requests[i % len(requests)]
        i += 1
        t0 = time.perf_counter()
        req = ts.ExportTraceServiceRequest.FromString(raw)
        n = sum(len(s.spans) for r in req.resource_spans for s in r.scope_spans)
        parse_s += time.perf_counter() - t0
        pending += n
        if pending >= SERVICE_BATCH_ROWS or time.monotonic() >= t_end:
            rows = min(pending, cap)
            data = [col[:rows] for col in columns]
            t0 = time.perf_counter()
            client.insert("audit_events", data, column_names=names, column_oriented=True,
                          database="bench", settings={
                              **settings, "insert_deduplication_token": f"ceiling-{inserts}"})
            insert_s += time.perf_counter() - t0
            inserts += 1
            spans += pending
            pending = 0
    # the same rows as a prebuilt Arrow table: the fastest insert path (for reference)
    try:
        import pyarrow as pa

        tbl = client.query_arrow(f"SELECT * FROM bench.audit_events LIMIT {SERVICE_BATCH_ROWS}")
        reps = max(3, min(20, inserts))
        for k in range(reps):
            t0 = time.perf_counter()
            client.insert_arrow("audit_events", tbl, database="bench",
                                settings={**settings, "insert_deduplication_token": f"arrow-{k}"})
            arrow_s += time.perf_counter() - t0
            arrow_rows += tbl.num_rows
        del pa
    except Exception as exc:  # reference figure only
        print(f"ceiling: arrow insert skipped ({type(exc).__name__})", file=sys.stderr)
    stored = int(client.command("SELECT count() FROM bench.audit_events"))
    out_file.write_text(json.dumps({
        "spans": spans, "inserts": inserts, "parse_seconds": parse_s,
        "insert_seconds": insert_s, "stored_rows": stored,
        "parse_spans_per_s": spans / parse_s if parse_s else 0,
        "insert_rows_per_s": spans / insert_s if insert_s else 0,
        "spans_per_s": spans / (parse_s + insert_s) if parse_s + insert_s else 0,
        "arrow_insert_rows_per_s": arrow_rows / arrow_s if arrow_s else None,
        "columns": len(names),
    }))


def run_ceiling(sample: list[bytes], workdir: Path, seconds: float) -> dict[str, Any]:
    sample_file = workdir / "ceiling-requests.bin"
    with open(sample_file, "wb") as f:
        for raw in sample:
            f.write(struct.pack("<I", len(raw)))
            f.write(raw)
    out = workdir / "ceiling.json"
    proc = subprocess.run(
        [sys.executable, __file__, "--_ceiling-worker", str(sample_file), str(seconds), str(out)],
        env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ceiling worker failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def _verify_count(svc: Service) -> int | None:
    token = (svc.data_dir / "credentials" / "admin.token").read_text().strip()
    env = _clean_env() | {"PHIAUDIT_TOKEN": token}
    proc = subprocess.run(
        [sys.executable, "-m", "phiaudit.receiver", "sql", "--data-dir", str(svc.data_dir),
         "--format", "json", "SELECT count() AS n FROM audit_events"],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        print(f"  (row count check failed: {proc.stderr.strip()[:200]})")
        return None
    return int(json.loads(proc.stdout)[0]["n"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="measured seconds (default 40)")
    p.add_argument("--warmup", type=float, default=6.0, help="warm-up seconds (default 6)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (8)")
    p.add_argument("--spans-per-request", type=int, default=512,
                   help="PHI spans per request (512, the SDK's batch size)")
    p.add_argument("--ceiling-seconds", type=float, default=8.0,
                   help="seconds of parse+insert for the ceiling (default 8)")
    p.add_argument("--max-pool-mb", type=int, default=2048,
                   help="memory for pre-serialized requests (default 2048 MiB)")
    p.add_argument("--py-spy", metavar="FILE", help="profile the service with py-spy record")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="a service setting (YAML value), e.g. --set workers=0")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.add_argument("--output", default=str(RESULTS), help=f"JSON results ({RESULTS})")
    p.add_argument("--_ceiling-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._ceiling_worker:
        f, s, o = args._ceiling_worker
        ceiling_worker(Path(f), float(s), Path(o))
        return 0

    spans = args.spans_per_request
    machine = _machine()
    started_at = dt.datetime.now(dt.UTC)
    print(f"phiaudit receiver benchmark  {started_at:%Y-%m-%d %H:%M} UTC  "
          f"{machine['cpus']} cpus  load {machine['loadavg_start'][0]:.2f}")
    factory = RequestFactory(spans)
    _check_factory(factory)
    req_bytes = len(factory.make())
    print(f"  request: {spans} PHI spans, {req_bytes / 1024:.0f} KiB serialized")

    workdir = Path(tempfile.mkdtemp(prefix="phiaudit-bench-"))
    svc: Service | None = None

    def _terminated(signum: int, frame: Any) -> None:
        # `timeout` and job control send SIGTERM: leave through the finally below, which stops
        # the service and removes its store (~1.3 GB after a 30 s run), not around it
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminated)
    try:
        t0 = time.monotonic()
        settings = {}
        for item in args.set:
            key, _, value = item.partition("=")
            settings[key] = yaml.safe_load(value)
        svc = start_service(workdir / "data", args.py_spy, settings)
        startup_s = time.monotonic() - t0
        time.sleep(1.0)
        rss_idle = svc.status("VmRSS")
        print(f"  service pid {svc.pid} on {svc.address} (started in {startup_s:.1f} s, "
              f"idle RSS {rss_idle / (1 << 20):,.0f} MiB)")

        # warm-up: also calibrates how many requests to pre-serialize
        warm_pool = Pool(factory, max(args.clients * 4, 32))
        warm, warm_s = drive(svc.address, warm_pool, args.clients, args.warmup, spans, "warm-up")
        warm_rate = warm.acked_spans / warm_s if warm_s else 0
        want = int(max(warm_rate, 5_000) * 1.6 * args.seconds / spans) + args.clients * 4
        cap = args.max_pool_mb * (1 << 20) // req_bytes
        count = min(want, cap)
        t0 = time.monotonic()
        pool = Pool(factory, count)
        print(f"  pre-serialized {count:,} requests ({count * req_bytes / (1 << 20):,.0f} MiB) "
              f"in {time.monotonic() - t0:.1f} s (warm-up rate {warm_rate:,.0f} spans/s)")
        sample = pool.sample(min(count, 64))

        cpu0 = svc.cpu_seconds()
        host0 = _host_cpu()
        before = svc.metrics()
        sampler = RssSampler(svc)
        load, wall = drive(svc.address, pool, args.clients, args.seconds, spans, "measure")
        rss_peak = sampler.stop()
        cpu1 = svc.cpu_seconds()
        host1 = _host_cpu()
        hwm = svc.status("VmHWM")
        rss_now = svc.status("VmRSS")
        rss_parts = svc.statuses("RssAnon", "RssFile", "RssShmem")
        try:
            metrics = svc.metrics()
        except Exception as exc:
            metrics = {"error": type(exc).__name__}
        # the group commit during the measured window: rows per insert, and how much of the
        # time the writer was writing (the rest it waited for requests being processed)
        batches = metrics.get("writer_batches", 0) - before.get("writer_batches", 0)
        commit = {
            "batches": batches,
            "rows_per_batch": (metrics.get("writer_rows", 0) - before.get("writer_rows", 0))
            / batches if batches else 0.0,
            "writer_busy_share": (metrics.get("writer_busy_ms", 0)
                                  - before.get("writer_busy_ms", 0)) / 1000 / wall
            if wall else 0.0,
        }
        stored = _verify_count(svc)
        code = svc.stop()
        log = svc.log_path.read_text(errors="replace")
        writer_line = next((ln for ln in log.splitlines() if "stopped:" in ln), "")
        svc = None

        print("  ceiling: protobuf parse + columnar chDB insert (separate process) ...")
        ceiling = run_ceiling(sample, workdir, args.ceiling_seconds)
    finally:
        if svc is not None:
            svc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(Path(str(workdir / "data") + ".keys"), ignore_errors=True)
        else:
            print(f"  kept {workdir}")

    rate = load.acked_spans / wall if wall else 0.0
    p50, p99 = _pct(load.latencies, 50), _pct(load.latencies, 99)
    windows = []
    prev_t, prev_n = 0.0, 0
    for t, n in load.timeline:
        if t > args.seconds + 0.5:  # the drain after the clock stopped is not a window
            break
        if t - prev_t >= 5:
            windows.append((n - prev_n) / (t - prev_t) if t > prev_t else 0)
            prev_t, prev_n = t, n
    ratio = rate / ceiling["spans_per_s"] if ceiling.get("spans_per_s") else None
    checks = {
        "spans_per_s": (rate >= TARGET_SPANS_PER_S, f">= {TARGET_SPANS_PER_S:,}"),
        "p99_ack_s": (p99 < TARGET_P99_S, f"< {TARGET_P99_S} s"),
        "peak_rss": (hwm < TARGET_RSS_BYTES, "< 1 GiB"),
    }
    machine["loadavg_end"] = os.getloadavg()
    # the share of this VM's CPU time the hypervisor gave to others while we measured: a
    # shared machine can steal a third of it, and then spans/s says more about the neighbours
    # than about the code; the CPU the service spent per span is steadier
    host_total = sum(host1) - sum(host0)
    machine["steal_share"] = (host1[7] - host0[7]) / host_total if host_total > 0 else 0.0
    result = {
        "date": started_at.isoformat(timespec="seconds"),
        "machine": machine,
        "config": {"seconds": args.seconds, "warmup": args.warmup, "clients": args.clients,
                   "spans_per_request": spans, "request_bytes": req_bytes,
                   "pool_requests": count, "made_during_run": pool.made_during_run,
                   "py_spy": bool(args.py_spy)},
        "service": {
            "spans_per_s": rate, "acked_spans": load.acked_spans,
            "acked_requests": load.acked_requests, "wall_seconds": wall,
            "ack_latency_s": {"p50": p50, "p90": _pct(load.latencies, 90), "p99": p99,
                              "max": max(load.latencies, default=float("nan")),
                              "mean": statistics.fmean(load.latencies)
                              if load.latencies else float("nan")},
            "unavailable": load.unavailable, "other_errors": load.other_errors,
            "window_spans_per_s": windows, "peak_rss_bytes": hwm,
            "rss_end_bytes": rss_now, "rss_idle_bytes": rss_idle, "rss_end_parts": rss_parts,
            "rss_peak_sample": rss_peak,
            "cpu_seconds": cpu1 - cpu0, "cpu_cores_used": (cpu1 - cpu0) / wall if wall else 0,
            "cpu_us_per_span": (cpu1 - cpu0) / load.acked_spans * 1e6
            if load.acked_spans else None,
            "stored_rows": stored, "exit_code": code, "writer": writer_line.split(": ", 2)[-1],
            "metrics": metrics, "startup_seconds": startup_s, "group_commit": commit,
        },
        "ceiling": ceiling,
        "ratio_service_to_ceiling": ratio,
        "targets": {k: {"pass": ok, "target": t} for k, (ok, t) in checks.items()},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def row(name: str, value: str, key: str | None = None) -> None:
        mark = ""
        if key:
            ok, target = checks[key]
            mark = f"{'PASS' if ok else 'MISS'}  (target {target})"
        print(f"  {name:<34} {value:>16}  {mark}")

    print()
    row("service PHI spans/s (sustained)", f"{rate:,.0f}", "spans_per_s")
    row("  min / max 5 s window",
        f"{min(windows, default=0):,.0f} / {max(windows, default=0):,.0f}")
    row("ack latency p50", f"{p50 * 1000:,.0f} ms")
    row("ack latency p99", f"{p99 * 1000:,.0f} ms", "p99_ack_s")
    row("peak RSS (VmHWM)", f"{hwm / (1 << 20):,.0f} MiB", "peak_rss")
    row("  idle RSS after start-up", f"{rss_idle / (1 << 20):,.0f} MiB")
    row("  highest 0.1 s sample: anon / file",
        f"{rss_peak['RssAnon'] / (1 << 20):,.0f} / {rss_peak['RssFile'] / (1 << 20):,.0f} MiB "
        f"at {rss_peak['at_s']:,.0f} s")
    row("  memory releases / code page-outs",
        f"{metrics.get('memory_releases', 0):,} / {metrics.get('memory_code_page_outs', 0):,}")
    row("  RSS at end: anon / file-backed", f"{rss_parts['RssAnon'] / (1 << 20):,.0f} / "
        f"{rss_parts['RssFile'] / (1 << 20):,.0f} MiB")
    row("UNAVAILABLE answers", f"{load.unavailable:,}")
    if load.other_errors:
        row("other errors", json.dumps(load.other_errors))
    row("service CPU (cores busy)", f"{result['service']['cpu_cores_used']:.2f}")
    if result["service"]["cpu_us_per_span"]:
        row("  service CPU per span", f"{result['service']['cpu_us_per_span']:.1f} us")
    row("host CPU stolen (hypervisor)", f"{machine['steal_share']:.0%}")
    row("rows per insert / writer busy", f"{commit['rows_per_batch']:,.0f} / "
        f"{commit['writer_busy_share']:.0%}")
    row("rows stored / spans acked", f"{stored} / {load.acked_spans}")
    row("ceiling: parse spans/s", f"{ceiling['parse_spans_per_s']:,.0f}")
    row("ceiling: columnar insert rows/s", f"{ceiling['insert_rows_per_s']:,.0f}")
    if ceiling.get("arrow_insert_rows_per_s"):
        row("  (prebuilt Arrow insert rows/s)", f"{ceiling['arrow_insert_rows_per_s']:,.0f}")
    row("ceiling: parse + insert spans/s", f"{ceiling['spans_per_s']:,.0f}")
    row("ratio service / ceiling", f"{ratio:.2f}" if ratio else "n/a")
    print(f"\n  results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
