"""The service's local spool: while the store fails, batches (encrypted and chained) are
written to local disk with fsync and acknowledged; they drain, in order and exactly once,
when the store answers again, also after a restart or a SIGKILL, and the chain never forks.

The store failure is injected by ``tests.receiver.flaky_service`` (a test double: the real
service and chDB store, with every insert failing while a flag file exists), because the
embedded ClickHouse cannot be made to fail for real here.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path

import grpc

from tests.conftest import RunningService, start_service
from tests.receiver.flaky_service import flag_path
from tests.receiver.otlp_raw import RawClient, audit_span, new_trace_id, trace_request


def _start(base: Path) -> RunningService:
    return start_service(base / "data", module="tests.receiver.flaky_service")


def _until(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _stored(svc: RunningService) -> dict[str, int]:
    rows = svc.rows("SELECT trace_id, count() AS n, uniqExact(event_id) AS u "
                    "FROM audit_events GROUP BY trace_id")
    assert all(r["n"] == r["u"] for r in rows), "duplicate events"
    return {r["trace_id"]: r["n"] for r in rows}


def _chain_ok(svc: RunningService) -> None:
    rows = svc.rows("SELECT writer_id, groupArray(seq) AS seqs FROM "
                    "(SELECT writer_id, seq FROM audit_events ORDER BY seq) GROUP BY writer_id")
    for r in rows:
        assert r["seqs"] == list(range(1, len(r["seqs"]) + 1)), "gap or fork in the chain"


def test_outage_is_spooled_acknowledged_and_drained_once(tmp_path: Path) -> None:
    svc = _start(tmp_path)
    flag = flag_path(svc.data_dir)
    sent: dict[str, int] = {}
    try:
        flag.touch()
        with RawClient(svc.address) as client:
            for i in range(5):
                tid = new_trace_id()
                raw = trace_request([audit_span(tid, f"SPOOLPAT{i}-{j}") for j in range(4)])
                assert client.export(raw, timeout=10) == grpc.StatusCode.OK
                sent[tid.hex()] = 4
        spool = svc.data_dir / "spool"
        files = list(spool.glob("*.arrow"))
        assert files, "nothing was spooled"
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
            assert b"SPOOLPAT" not in f.read_bytes()  # ciphertexts only
        assert svc.metrics()["spooled_blocks"] >= 1
        flag.unlink()
        _until(lambda: svc.metrics().get("spool_bytes", 1) == 0)
        assert _stored(svc) == sent
        _chain_ok(svc)
        assert not list(spool.glob("*.arrow"))
    finally:
        flag.unlink(missing_ok=True)
        assert svc.stop() == 0, svc.log()
    for i in range(5):
        assert f"SPOOLPAT{i}" not in svc.log()


def test_restart_with_a_full_spool_resumes_the_chain_without_a_fork(tmp_path: Path) -> None:
    svc = _start(tmp_path)
    flag = flag_path(svc.data_dir)
    sent: dict[str, int] = {}

    def send(client: RawClient, n: int) -> None:
        for _ in range(n):
            tid = new_trace_id()
            raw = trace_request([audit_span(tid, f"p-{k}") for k in range(3)])
            assert client.export(raw, timeout=10) == grpc.StatusCode.OK
            sent[tid.hex()] = 3

    with RawClient(svc.address) as client:
        send(client, 2)  # committed
        flag.touch()
        send(client, 3)  # spooled
    assert svc.stop() == 0, svc.log()
    assert list((svc.data_dir / "spool").glob("*.arrow"))
    # restart while the store still fails: the chain continues after the spooled rows
    svc2 = _start(tmp_path)
    try:
        with RawClient(svc2.address) as client:
            send(client, 2)
        flag.unlink()
        _until(lambda: svc2.metrics().get("spool_bytes", 1) == 0)
        assert _stored(svc2) == sent
        _chain_ok(svc2)
    finally:
        flag.unlink(missing_ok=True)
        assert svc2.stop() == 0, svc2.log()


def test_sigkill_while_spooling_loses_nothing_acknowledged(tmp_path: Path) -> None:
    svc = _start(tmp_path)
    flag = flag_path(svc.data_dir)
    acked: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop() -> None:
        with RawClient(svc.address) as client:
            while not stop.is_set():
                tid = new_trace_id()
                raw = trace_request([audit_span(tid, f"k-{k}") for k in range(5)])
                if client.export(raw, timeout=5) == grpc.StatusCode.OK:
                    with lock:
                        acked[tid.hex()] = 5

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    flag.touch()  # the store goes down under load: batches go to the spool
    time.sleep(1.5)
    os.kill(svc.proc.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(30)
    svc.proc.wait(30)
    assert acked
    flag.unlink()
    svc2 = _start(tmp_path)  # drains the spool first
    try:
        _until(lambda: svc2.metrics().get("spool_bytes", 1) == 0)
        stored = _stored(svc2)
        missing = [t for t in acked if stored.get(t) != 5]
        assert not missing, f"{len(missing)} acknowledged requests lost"
        _chain_ok(svc2)
    finally:
        assert svc2.stop() == 0, svc2.log()
