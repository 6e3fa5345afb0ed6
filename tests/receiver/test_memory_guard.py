"""The service gives its allocators' freed memory back to the system above
``memory_release_mb`` (``MemoryGuard``), and only above it; a failing release does not stop
the service."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from phiaudit.receiver._config import ServiceConfig
from phiaudit.receiver._memory import MemoryGuard, resident_bytes
from phiaudit.storage import ConfigError, StorageUnavailable
from tests.conftest import start_service


def _status_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_resident_bytes_is_the_process_resident_set() -> None:
    got, expected = resident_bytes(), _status_rss()
    assert got > 0 and abs(got - expected) < 16 << 20, (got, expected)


def test_releases_only_above_the_mark() -> None:
    calls: list[str] = []
    guard = MemoryGuard(600 << 20, lambda: calls.append("release"),
                        count=lambda: calls.append("count"), resident=lambda: 500 << 20)
    assert guard.check() is False and calls == [] and guard.releases == 0
    guard = MemoryGuard(600 << 20, lambda: calls.append("release"),
                        count=lambda: calls.append("count"), resident=lambda: 700 << 20)
    assert guard.check() is True and calls == ["release", "count"] and guard.releases == 1


def test_a_failing_release_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise StorageUnavailable("release memory: ClickHouse error 497 ACCESS_DENIED")

    guard = MemoryGuard(1, fail)
    with caplog.at_level(logging.WARNING, logger="phiaudit.receiver"):
        assert guard.check() is True and guard.check() is True
    assert guard.failures == 2 and guard.releases == 2
    warnings = [r for r in caplog.records if "could not release" in r.getMessage()]
    assert len(warnings) == 1


def test_the_thread_runs_until_stopped_and_zero_turns_it_off() -> None:
    n: list[int] = []
    guard = MemoryGuard(1, lambda: n.append(1), interval=0.01)
    guard.start()
    deadline = time.monotonic() + 10
    while len(n) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    guard.stop()
    assert len(n) >= 3
    stopped = len(n)
    time.sleep(0.1)
    assert len(n) == stopped
    off = MemoryGuard(0, lambda: n.append(1), interval=0.01)
    off.start()
    time.sleep(0.1)
    off.stop()
    assert len(n) == stopped


@pytest.mark.parametrize(("key", "default", "zero"), [
    ("memory_release_mb", 768, "never"), ("query_memory_mb", 64, "no limit")])
def test_memory_keys_are_validated(key: str, default: int, zero: str) -> None:
    ServiceConfig(data_dir="d", **{key: 0}).validate()
    assert getattr(ServiceConfig(data_dir="d"), key) == default
    for bad in (-1, True, str(default), 1.5, (1 << 20) + 1):
        with pytest.raises(ConfigError) as exc:
            ServiceConfig(data_dir="d", **{key: bad}).validate()
        assert f"{key}: an integer from 0 ({zero}) to 1048576" in exc.value.errors


def test_the_service_releases_memory_above_its_mark(tmp_path: Path) -> None:
    # a 1 MiB mark: the service is always above it, so it releases every interval, through
    # its own restricted engine user; it keeps serving, and stops cleanly
    config = tmp_path / "phiaudit.yaml"
    config.write_text("memory_release_mb: 1\n")
    svc = start_service(tmp_path / "data", "--config", str(config))
    try:
        deadline = time.monotonic() + 30
        releases = 0
        while time.monotonic() < deadline:
            releases = svc.metrics().get("memory_releases", 0)
            if releases >= 3:
                break
            time.sleep(0.2)
        assert releases >= 3
        assert "could not release" not in svc.log()
        assert svc.sql("SELECT count() FROM audit_events").returncode == 0
    finally:
        assert svc.stop() == 0, svc.log()


def test_the_default_mark_leaves_an_idle_service_alone(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "data")
    try:
        time.sleep(1.0)
        metrics = svc.metrics()
        assert metrics.get("memory_releases", 0) == 0
        # the rule runs are reported beside it (none has failed or split on an idle service)
        assert {k: metrics[k] for k in ("rule_ticks_failed", "rule_failures",
                                        "rule_query_splits")} == dict.fromkeys(
            ("rule_ticks_failed", "rule_failures", "rule_query_splits"), 0)
        assert {"rule_ticks", "rule_alerts", "rule_windows_fired",
                "rule_windows_already_alerted"} <= metrics.keys()
    finally:
        assert svc.stop() == 0, svc.log()
