"""The service gives its allocators' freed memory back to the system above
``memory_release_mb`` (``MemoryGuard``), and only above it; a failing release does not stop
the service. Above the mark it also pages out the engine's library code not in use
(``CodePager``), at most every ``code_interval`` seconds."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phiaudit.receiver._config import ServiceConfig
from phiaudit.receiver._memory import CodePager, MemoryGuard, code_mappings, resident_bytes
from phiaudit.storage import ConfigError, StorageUnavailable, Store, StoreLocation, migrate
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


def _resident_in(directory: str) -> int:
    """Resident bytes of this process's mappings of files under ``directory`` (smaps)."""
    root, total, inside = os.path.join(directory, ""), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5].startswith(root)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_code_mappings_are_the_read_only_file_mappings_under_the_directories(
        tmp_path: Path) -> None:
    def mapping(addresses: str, perms: str, path: str, anonymous: int = 0) -> str:
        return (f"{addresses} {perms} 00000000 08:01 1 {path}\n"
                f"Size:               1024 kB\nRss:                 512 kB\n"
                f"Anonymous:        {anonymous} kB\nVmFlags: rd mr mw me\n")

    smaps = tmp_path / "smaps"
    smaps.write_text(
        mapping("7f0000000000-7f0000100000", "r--p", "/opt/lib/chdb/_chdb.abi3.so")
        + mapping("7f0000100000-7f0000400000", "r-xp", "/opt/lib/chdb/_chdb.abi3.so")
        # relocations, written at load and then protected: anonymous pages, left alone
        + mapping("7f0000400000-7f0000410000", "r--p", "/opt/lib/chdb/_chdb.abi3.so", 64)
        + mapping("7f0000410000-7f0000420000", "rw-p", "/opt/lib/chdb/_chdb.abi3.so", 4)
        + mapping("7f0000500000-7f0000600000", "r-xp", "/opt/lib/chdb2/other.so")
        + mapping("7f0000600000-7f0000700000", "r-xp", "/opt/lib/chdb/sub/x.so")
        + "7f0000700000-7f0000800000 rw-p 00000000 00:00 0\nAnonymous:   1024 kB\n"
        + mapping("7ffd00000000-7ffd00021000", "rw-p", "[stack]", 132))
    assert code_mappings(["/opt/lib/chdb"], str(smaps)) == [
        (0x7F0000000000, 0x100000), (0x7F0000100000, 0x300000), (0x7F0000600000, 0x100000)]
    assert code_mappings(["/opt/lib/chdb"], str(tmp_path / "missing")) == []


@pytest.fixture(scope="module")
def engine_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    location = StoreLocation(data_dir=tmp_path_factory.mktemp("pager"))
    migrate(location)
    store = Store.open(location)
    store.query("SELECT count() FROM audit_events")
    yield store
    store.close()


def test_page_out_returns_the_engines_code_to_the_system(engine_store: Store) -> None:
    (directory,) = engine_store.engine_code
    assert os.path.isfile(os.path.join(directory, "_chdb.abi3.so"))
    assert code_mappings([directory])
    # an engine that has run touched more than 50 MiB of its library (measured: ~185 MiB)
    engine_store.query("SELECT sum(number) FROM numbers(1000000)")
    before = _resident_in(directory)
    assert before > 50 << 20, before
    pager = CodePager(engine_store.engine_code)
    freed = pager.page_out()
    after = _resident_in(directory)
    assert after < before / 2, (before >> 20, after >> 20)
    assert freed > (before - after) / 2, (freed >> 20, (before - after) >> 20)
    # the code still in use comes back from the file
    assert engine_store.query("SELECT sum(number) FROM numbers(1000)")[1] == [
        (499500,)]
    assert _resident_in(directory) > after


def test_the_guard_pages_out_at_most_every_code_interval_and_only_above_the_mark(
        engine_store: Store) -> None:
    now = [100.0]
    rss = [700 << 20]
    counted: list[int] = []
    guard = MemoryGuard(600 << 20, lambda: None, resident=lambda: rss[0],
                        code=engine_store.engine_code, code_interval=10.0,
                        count_code=lambda: counted.append(1), clock=lambda: now[0])
    assert guard.check() and guard.page_outs == 1 and counted == [1]
    now[0] += 9.9
    assert guard.check() and guard.page_outs == 1
    now[0] += 0.2
    rss[0] = 500 << 20
    assert not guard.check() and guard.page_outs == 1
    rss[0] = 700 << 20
    assert guard.check() and guard.page_outs == 2 and counted == [1, 1]
    # no code to page out (a server's store): releases go on, no page-outs
    plain = MemoryGuard(600 << 20, lambda: None, resident=lambda: 700 << 20)
    assert plain.check() and plain.releases == 1 and plain.page_outs == 0


def test_a_server_store_names_no_engine_code() -> None:
    store = Store(client=None, location=StoreLocation(url="https://ch.example:8443"))
    assert store.engine_code == ()


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
            metrics = svc.metrics()
            releases = metrics.get("memory_releases", 0)
            if releases >= 3 and metrics.get("memory_code_page_outs", 0) >= 1:
                break
            time.sleep(0.2)
        assert releases >= 3
        # the first release also paged out the engine's code (then at most every 2 s)
        assert 1 <= metrics.get("memory_code_page_outs", 0) < releases
        assert re.search(r"paged out \d+ MiB of the engine's code", svc.log()), svc.log()
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
        assert metrics.get("memory_code_page_outs", 0) == 0
        # the rule runs are reported beside it (none has failed or split on an idle service)
        assert {k: metrics[k] for k in ("rule_ticks_failed", "rule_failures",
                                        "rule_query_splits")} == dict.fromkeys(
            ("rule_ticks_failed", "rule_failures", "rule_query_splits"), 0)
        assert {"rule_ticks", "rule_alerts", "rule_windows_fired",
                "rule_windows_already_alerted"} <= metrics.keys()
    finally:
        assert svc.stop() == 0, svc.log()
