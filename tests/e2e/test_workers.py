"""Requests processed in worker processes (both cores) are stored exactly as in process, and a
worker that dies costs one retried request, not the service."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import start_service, tracer_provider


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    todo, found = [pid], []
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _workers(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(child)
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _send(address: str, n: int, tag: str) -> None:
    provider = tracer_provider(address)
    tracer = provider.get_tracer("ehr")
    for i in range(n):
        with tracer.start_as_current_span("GET /fhir/Patient/{id}", attributes={
                "phi.audit.event": True, "phi.audit.action": "read",
                "phi.resource.type": "Patient", "phi.resource.id": f"{tag}-{i}",
                "phi.patient.id": f"{tag}-{i}", "enduser.id": "dr.w",
                "client.address": "10.9.8.7"}):
            pass
    provider.shutdown()


def test_worker_processes_store_the_same_rows(tmp_path: Path) -> None:
    cfg = tmp_path / "svc.yaml"
    # the Python path (the compiled extractor keeps traces in process)
    cfg.write_text("workers: 2\nworker_min_bytes: 1\nnative_extractor: false\n")
    svc = start_service(tmp_path / "data", "--config", str(cfg))
    try:
        workers = _descendants(svc.proc.pid)
        assert len(workers) >= 2, "the worker processes did not start"
        _send(svc.address, 30, "wk")
        rows = svc.rows("SELECT patient_id, resource_id, client_address, actor_id, seq "
                        "FROM audit_events ORDER BY seq", decrypt=True)
        assert [r["seq"] for r in rows] == list(range(1, 31))
        assert sorted(r["patient_id"] for r in rows) == sorted(f"wk-{i}" for i in range(30))
        assert all(r["resource_id"] == r["patient_id"] and r["client_address"] == "10.9.8.7"
                   and r["actor_id"] == "dr.w" for r in rows)
        assert svc.metrics().get("traces_acknowledged", 0) == 30

        # a worker dies: the request in flight gets UNAVAILABLE, the exporter retries, the
        # pool is restarted, nothing is lost or doubled
        for worker in _workers(svc.proc.pid):
            os.kill(worker, signal.SIGKILL)
        time.sleep(0.5)
        _send(svc.address, 10, "after")
        count = svc.rows("SELECT count() AS n, uniqExact(event_id) AS u FROM audit_events "
                         "WHERE patient_bidx IN (SELECT patient_bidx FROM audit_events) ")[0]
        assert count["n"] == count["u"] == 40
        assert svc.metrics().get("worker_failures", 0) >= 1, "no worker was killed"
        assert svc.proc.poll() is None
    finally:
        assert svc.stop() == 0, svc.log()


def test_workers_do_not_outlive_a_killed_service(tmp_path: Path) -> None:
    cfg = tmp_path / "svc.yaml"
    cfg.write_text("workers: 2\n")
    svc = start_service(tmp_path / "data", "--config", str(cfg))
    workers = _workers(svc.proc.pid)
    assert len(workers) == 2
    os.kill(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait(30)
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [w for w in workers if _running(w)]
    assert not alive, "worker processes outlived the service"
