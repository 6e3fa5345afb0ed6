"""The compiled extractor (``receiver/_native.c``) against the Python reference.

The Python path (``_extract.Extractor`` + ``RecordEncoder``) is the reference: every span the
compiled path takes must give exactly the rows Python would store (encrypted columns equal
once decrypted, ``extra`` JSON byte for byte, blind indexes equal, the ``hash`` column the
leaf of the row's own values), the spans it leaves must be mapped by Python as if it had
never run, and it must take the common case. Untrusted bytes must never crash it: that runs in
a subprocess (``native_fuzz.py``), once more under glibc's malloc checks.

The generator and the comparison are in ``native_corpus.py``. ``NATIVE_TEST_SEED`` and
``NATIVE_TEST_SCALE`` (environment) vary the corpus for longer runs by hand.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from phiaudit.receiver._extract import Extractor
from phiaudit.receiver._process import RequestProcessor, native_for
from tests.conftest import ROOT, cli_env
from tests.receiver import native_build
from tests.receiver import native_corpus as nc

SEED = int(os.environ.get("NATIVE_TEST_SEED", "20260101"))
SCALE = float(os.environ.get("NATIVE_TEST_SCALE", "1"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> nc.Keys:
    native_build.require_native()
    return nc.Keys.open(tmp_path_factory.mktemp("native") / "data")


# ------------------------------------------------------------------------------------------
# 1. differential, field by field


def test_compiled_rows_equal_python_rows_field_by_field(keys: nc.Keys) -> None:
    requests = nc.corpus(SEED, int(400 * SCALE))
    nonces: list[bytes] = []
    outcomes = [nc.differential(keys, r.raw, f"request {i} (seed {SEED})", nonces)
                for i, r in enumerate(requests)]
    t = nc.tally(requests, outcomes)
    seen, taken = t["seen"], t["taken"]
    spans = sum(seen.values())
    assert spans > 5000, "the corpus is too small to say anything"

    # the generator produced every shape (it did not quietly degrade)
    shapes = {s.split(":", 1)[1].removesuffix("(odd resource)") for s in t["shape_seen"]}
    for name, _ in [*nc.OK_SHAPES, *nc.PY_SHAPES, *nc.ANY_SHAPES]:
        assert name in shapes, f"no span of shape {name} in the corpus"

    # the compiled path took the common case (all of it, in fact) ...
    assert sum(o.native_none for o in outcomes) == 0, "requests the compiled path refused"
    assert seen["plain"] > 1000 and taken["plain"] >= 0.95 * seen["plain"], \
        f"plain audit spans taken: {taken['plain']} of {seen['plain']}"
    assert taken["ok"] >= 0.9 * seen["ok"], f"mapped shapes taken: {taken['ok']} of {seen['ok']}"
    # ... and left every shape it does not map to Python
    wrongly = {s: n for s, n in t["shape_taken"].items() if s.startswith("python:") and n}
    assert taken["python"] == 0, f"shapes the compiled path should leave to Python: {wrongly}"

    # AES-GCM: never a nonce twice
    assert len(nonces) > 10_000
    assert len(set(nonces)) == len(nonces), "a GCM nonce was used twice"


# ------------------------------------------------------------------------------------------
# 2. through RequestProcessor


def _dict_rows(audit: Any) -> list[dict[str, Any]]:
    if isinstance(audit, pa.Table):
        return nc.table_rows(audit)
    return [dict(zip(nc.NAMES, row, strict=True)) for row in audit]


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Both processors read the same clock (received_time, absurd-time checks)."""
    monkeypatch.setattr(time, "time_ns", lambda: nc.NOW_US * 1000 + 123)
    yield


def test_request_processor_same_rows_with_and_without_the_compiled_path(
        keys: nc.Keys, fixed_clock: None) -> None:
    sensitive = ["http.request.header.authorization", "app.*"]
    native = native_for(keys.ring)
    assert native is not None
    fast = RequestProcessor(keys.encoder, Extractor(sensitive), native=native)
    slow = RequestProcessor(keys.encoder, Extractor(sensitive), native=None)
    took = 0
    for i, req in enumerate(nc.corpus(SEED + 1, int(80 * SCALE))):
        where = f"request {i} (seed {SEED + 1})"
        a = fast.process("traces", req.raw, "sender")
        b = slow.process("traces", req.raw, "sender")
        assert isinstance(a.audit_rows, pa.Table)
        a.audit_rows.validate(full=True)
        nc.compare_rows(keys, _dict_rows(b.audit_rows), _dict_rows(a.audit_rows), where)
        assert a.trace_rows == b.trace_rows, where
        assert nc.clear_infra(keys, a.infra_rows) == nc.clear_infra(keys, b.infra_rows), where
        assert a.rollup_rows == b.rollup_rows, where
        sa = dict(a.stats)
        took += sa.pop("native_spans", 0)
        assert sa == b.stats, where
    assert fast.native_failures == 0
    assert took > 300, f"the compiled path took {took} spans"


def test_concurrent_calls_give_the_same_rows(keys: nc.Keys) -> None:
    """The service calls the compiled path from several threads (it runs without the GIL)."""
    raws = [r.raw for r in nc.corpus(SEED + 2, 40)]

    def run(raw: bytes) -> list[dict[str, Any]]:
        got = keys.native.extract(raw, nc.SENDER, nc.NOW_US)
        assert got is not None
        return nc.table_rows(got[0])

    alone = [run(raw) for raw in raws]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, raws * 4))
    for i, rows in enumerate(together):
        nc.compare_rows(keys, alone[i % len(raws)], rows, f"request {i % len(raws)} (threads)")


# ------------------------------------------------------------------------------------------
# 3. untrusted bytes, in subprocesses


def _malloc_debug_env() -> dict[str, str]:
    """glibc's heap checks: MALLOC_CHECK_ needs libc_malloc_debug preloaded since glibc 2.34;
    MALLOC_PERTURB_ fills allocated and freed memory with a pattern."""
    env = {"MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
    libs = sorted(glob.glob("/usr/lib/*/libc_malloc_debug.so.0")
                  + glob.glob("/lib/*/libc_malloc_debug.so.0")
                  + glob.glob("/usr/lib64/libc_malloc_debug.so.0"))
    if libs:
        env["LD_PRELOAD"] = libs[0]
        env["GLIBC_TUNABLES"] = "glibc.malloc.check=3:glibc.malloc.perturb=165"
    return env


def _ubsan_build(out_dir: Path) -> Path | None:
    """The extension built with UndefinedBehaviorSanitizer (aborting on the first report), or
    None where that cannot be built (no compiler or no sanitizer runtime): an extra check."""
    return native_build.sanitized_build(out_dir, "undefined")


def test_row_limit_is_the_same_on_both_paths(keys: nc.Keys) -> None:
    """``max_rows``: the compiled walker leaves a request that would make more rows than that
    to Python (returns None), and ``RequestProcessor`` refuses it whichever path runs, at
    exactly the same count."""
    from phiaudit.receiver._process import RequestTooLarge
    from tests.receiver.otlp_raw import audit_span, new_trace_id, trace_request

    tid = new_trace_id()
    raw = trace_request([audit_span(tid, [f"syn-lim-{i}-{k}" for k in range(5)])
                         for i in range(3)])
    native = keys.native
    now = time.time_ns() // 1000
    got = native.extract(raw, "anonymous", now, 15)
    assert got is not None and got[0].num_rows == 15
    assert native.extract(raw, "anonymous", now, 14) is None
    for compiled in (native, None):
        for limit, refused in ((15, False), (14, True), (1, True), (None, False)):
            proc = RequestProcessor(keys.encoder, Extractor([]), compiled, limit)
            if refused:
                with pytest.raises(RequestTooLarge):
                    proc.process("traces", raw, "anonymous")
            else:
                assert len(proc.process("traces", raw, "anonymous").audit_rows) == 15


def _extras(keys: nc.Keys, audit_rows: Any) -> list[tuple[uuid.UUID, str]]:
    """(event id, decrypted extra JSON) of every row, in order: rows or an Arrow table."""
    if isinstance(audit_rows, pa.Table):
        rows = [(uuid.UUID(bytes=r["event_id"]), r["extra"])
                for r in nc.table_rows(audit_rows)]
    else:
        names = [c.name for c in nc.AUDIT_COLUMNS]
        i_id, i_extra = names.index("event_id"), names.index("extra")
        rows = [(r[i_id], r[i_extra]) for r in audit_rows]
    return [(eid, keys.cipher.decrypt("extra", bytes(blob), eid.bytes).decode())
            for eid, blob in rows]


def test_a_large_extra_is_stored_once_per_span_on_both_paths(keys: nc.Keys) -> None:
    """A span listing many patients makes a row each; its ``extra`` JSON (the attributes the
    mapping does not consume, and the list of patients past 10,000) went into every row: a
    1 kB attribute on 3,000 patients made 3 MB, the overflow list of a 20,000-patient span
    1.7 GB. Past 1 MiB per span only the first row carries it and the others name that row.
    The compiled walker leaves such a request to Python; both processors store the same."""
    from tests.receiver.otlp_raw import audit_span, new_trace_id, trace_request

    big = trace_request([audit_span(new_trace_id(), [f"syn-x-{k}" for k in range(3000)],
                                    **{"app.note": "n" * 1000})])
    small = trace_request([audit_span(new_trace_id(), [f"syn-y-{k}" for k in range(3)],
                                      **{"app.note": "n" * 1000})])
    now = time.time_ns() // 1000
    assert keys.native.extract(big, "anonymous", now) is None
    assert keys.native.extract(small, "anonymous", now) is not None
    seen = []
    for compiled in (keys.native, None):
        proc = RequestProcessor(keys.encoder, Extractor([]), compiled)
        extras = _extras(keys, proc.process("traces", big, "anonymous").audit_rows)
        assert len(extras) == 3000
        first_id, first = extras[0]
        assert json.loads(first)["app.note"] == "n" * 1000
        assert {x for _, x in extras[1:]} == {json.dumps({"phi.extra.in_event": str(first_id)},
                                                         separators=(",", ":"))}
        small_extras = _extras(keys, proc.process("traces", small, "anonymous").audit_rows)
        assert [json.loads(x)["app.note"] for _, x in small_extras] == ["n" * 1000] * 3
        seen.append(extras)
    assert seen[0] == seen[1]

    overflow = trace_request([audit_span(new_trace_id(),
                                         [f"syn-z-{k:05d}" for k in range(10_050)])])
    proc = RequestProcessor(keys.encoder, Extractor([]), keys.native)
    done = proc.process("traces", overflow, "anonymous")
    extras = _extras(keys, done.audit_rows)
    assert len(extras) == 10_000 and done.stats["patients_truncated"] == 50
    assert json.loads(extras[0][1])["phi.patient.id.overflow"] == [
        f"syn-z-{k:05d}" for k in range(10_000, 10_050)]
    assert sum(len(x) for _, x in extras) < 2 * 1024 * 1024


@pytest.mark.parametrize("writer", ["w-1", "host-a/%d%b%%", "wrïter " * 40, ""])
def test_compiled_linker_links_as_python(writer: str) -> None:
    """``_native.link`` (the writer's linker where the extension is built) gives exactly the
    chain ``link_arrow`` computes in Python: across seq digit boundaries, from genesis and
    from a head, for any writer id bytes; and refuses malformed input."""
    native_build.require_native()
    from phiaudit.receiver._fast import native_linker
    from phiaudit.storage import AUDIT_COLUMNS, ChainState, arrow_schema, link_arrow

    linker = native_linker()
    assert linker is not None
    rng = __import__("random").Random(7)
    schema = arrow_schema(AUDIT_COLUMNS)
    for seq, n in ((0, 1), (0, 12), (7, 5), (95, 10), (999_998, 3), (2**63, 2), (5, 0)):
        leaves = rng.randbytes(32 * n)
        cols = {f.name: pa.nulls(n, f.type) for f in schema}
        cols["hash"] = pa.Array.from_buffers(pa.binary(32), n, [None, pa.py_buffer(leaves)])
        cols["event_id"] = pa.array([rng.randbytes(16) for _ in range(n)], pa.binary(16))
        table = pa.table(cols, schema=schema)
        head = rng.randbytes(32) if seq else b"\x00" * 32
        state = ChainState(writer, seq, head)
        py, py_seq, py_head = link_arrow(state, table)
        c, c_seq, c_head = link_arrow(state, table, linker)
        assert (c_seq, c_head) == (py_seq, py_head)
        for name in ("seq", "prev_hash", "hash", "writer_id"):
            assert c.column(name).equals(py.column(name)), (name, seq, n)
    with pytest.raises(ValueError):
        linker(b"x" * 31, b"w", 0, b"\x00" * 32)
    with pytest.raises(ValueError):
        linker(b"x" * 32, b"w", 0, b"\x00" * 31)
    with pytest.raises(OverflowError):
        linker(b"x" * 64, b"w", 2**64 - 1, b"\x00" * 32)


def test_untrusted_bytes_never_crash_and_agree_with_python(tmp_path: Path) -> None:
    native_build.require_native()
    fuzz = [sys.executable, "-m", "tests.receiver.native_fuzz"]
    procs = {"fuzz": subprocess.Popen(
        [*fuzz, "--data-dir", str(tmp_path / "fuzz"), "--seed", str(SEED), "--scale",
         str(SCALE), "--seconds", "14"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    # the second run: glibc's heap checks, and (where it builds) a UBSan build of the extension
    extra = _malloc_debug_env()
    name = "fuzz under malloc checks"
    ubsan = _ubsan_build(tmp_path)
    if ubsan is not None:
        extra.update(NATIVE_TEST_SO=str(ubsan), UBSAN_OPTIONS="print_stacktrace=1:abort_on_error=1")
        name += " and UBSan"
    procs[name] = subprocess.Popen(
        [*fuzz, "--data-dir", str(tmp_path / "malloc"), "--seed", str(SEED + 7), "--scale",
         str(0.25 * SCALE), "--seconds", "8"],
        cwd=ROOT, env=cli_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, (rc, out, err) in results.items():
        tail = "\n".join(err.strip().splitlines()[-25:])
        assert rc >= 0, f"{name}: killed by signal {-rc} (a crash in the compiled path)\n{tail}"
        lines = out.strip().splitlines()
        assert lines, f"{name}: no summary (exit {rc})\n{tail}"
        summary = json.loads(lines[-1])
        assert rc == 0 and not summary["failures"] and not summary["slow"], \
            f"{name}: exit {rc}\n" + json.dumps(
                {k: summary.get(k) for k in ("failures", "slow", "python_errors")}, indent=1) \
            + f"\n{tail}"
        assert not summary["python_errors"]

        def total(suffix: str, s: dict[str, Any] = summary) -> int:
            return sum(v for k, v in s.items() if k.endswith(suffix) and isinstance(v, int))

        # the run did what it says: many calls, many compared with Python, rows among them
        assert summary["truncate.calls"] > 1000, name
        assert total(".calls") > (1000 if "malloc" in name else 5000), name
        assert summary.get("structured.compared", 0) > (50 if "malloc" in name else 300), name
        assert summary["native_spans_compared"] > 100, name
