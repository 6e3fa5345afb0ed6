"""The compiled validator (``_native.c``, ``validate``) against protobuf's own parser (upb).

The service no longer parses a trace request with protobuf only to refuse a malformed one: the
compiled validator gives protobuf's verdict, and protobuf parses the request only when the
compiled extractor leaves spans to the Python path. That is only sound if both accept exactly
the same bytes. Here: the validator's schema is the installed descriptors'; every wire-format
rule it encodes, pinned on upb itself (a protobuf upgrade that changes one fails here, by name);
the verdicts on mutated requests (``validate_fuzz.py``, in subprocesses, once under
AddressSanitizer where it builds); and ``RequestProcessor`` end to end, against the processor
without the compiled path.

Assertion messages name seeds, case indexes and counts, never request bytes.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from opentelemetry.proto.logs.v1 import logs_pb2

from phiaudit.receiver import _process
from phiaudit.receiver._extract import Extractor
from phiaudit.receiver._fast import trace_schema, validation_available
from phiaudit.receiver._process import MalformedRequest, RequestProcessor, native_for
from tests.conftest import ROOT, cli_env
from tests.receiver import native_build
from tests.receiver import native_corpus as nc
from tests.receiver import validate_fuzz as vf
from tests.receiver.otlp_raw import audit_span, logs_request, new_trace_id, span, trace_request

SEED = int(os.environ.get("NATIVE_TEST_SEED", "20260101"))
SCALE = float(os.environ.get("NATIVE_TEST_SCALE", "1"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> nc.Keys:
    native_build.require_native()
    return nc.Keys.open(tmp_path_factory.mktemp("validate") / "data")


# ------------------------------------------------------------------------------------------
# 1. the schema


def test_the_validator_knows_the_installed_schema() -> None:
    native = native_build.require_native()
    assert validation_available() == (True, "")
    mine = tuple(sorted((name, tuple(sorted(fields))) for name, fields in native.TRACE_SCHEMA))
    assert mine == trace_schema()
    names = {name.rsplit(".", 1)[-1] for name, _ in mine}
    assert {"ExportTraceServiceRequest", "ResourceSpans", "Resource", "ScopeSpans",
            "InstrumentationScope", "Span", "Event", "Link", "Status", "KeyValue", "AnyValue",
            "ArrayValue", "KeyValueList"} <= names
    assert native.MAX_DEPTH == vf.MAX_DEPTH


# ------------------------------------------------------------------------------------------
# 2. upb's rules, one by one (each must hold for upb itself and for the validator)


def _in_span(x: bytes) -> bytes:
    return vf.ld(1, vf.ld(2, vf.ld(2, x)))


def _in_any(x: bytes) -> bytes:
    return _in_span(vf.ld(9, vf.ld(1, b"k") + vf.ld(2, x)))


def _group(number: int, body: bytes = b"") -> bytes:
    return vf.tag(number, 3) + body + vf.tag(number, 4)


def _groups(n: int, number: int = 5) -> bytes:
    out = b""
    for _ in range(n):
        out = _group(number, out)
    return out


def _nested(levels: int, inner: bytes = b"") -> bytes:
    """A request whose innermost message is at ``levels`` (the request is level 0)."""
    path = [1, 2, 2, 9, 2]  # request > ResourceSpans > ScopeSpans > Span > KeyValue > AnyValue
    while len(path) < levels:
        path.append(5 if len(path) % 2 else 1)  # AnyValue.array_value, ArrayValue.values
    out = inner
    for number in reversed(path[:levels]):
        out = vf.ld(number, out)
    return out


T, V, L = vf.tag, vf.varint, vf.ld
RULES: list[tuple[str, bytes, bool]] = [
    ("empty request", b"", True),
    # tags
    ("tag in 5 bytes (over-long)", vf.overlong(100 << 3, 5) + b"\x01", True),
    ("tag in 6 bytes (over-long)", vf.overlong(100 << 3, 6) + b"\x01", False),
    ("known field's tag in 5 bytes", vf.overlong(1 << 3 | 2, 5) + b"\x00", True),
    ("known field's tag in 6 bytes", vf.overlong(1 << 3 | 2, 6) + b"\x00", False),
    ("largest field number", T(2**29 - 1, 0) + b"\x00", True),
    ("tag value 2^32", V(1 << 32) + b"\x00", False),
    ("field number 0, varint", b"\x00\x00", False),
    ("field number 0, length-delimited", b"\x02\x00", False),
    ("field number 0 in a span", _in_span(b"\x00\x00"), False),
    ("wire type 6", T(100, 6) + b"\x00", False),
    ("wire type 7", T(100, 7) + b"\x00", False),
    # varints
    ("varint in 10 bytes", T(100, 0) + vf.overlong(1, 10), True),
    ("varint in 11 bytes", T(100, 0) + vf.overlong(1, 11), False),
    ("varint's 10th byte 0x7f", T(100, 0) + b"\xff" * 9 + b"\x7f", True),
    ("known varint field in 11 bytes", _in_span(T(6, 0) + vf.overlong(3, 11)), False),
    ("unterminated varint", T(100, 0) + b"\xff\xff", False),
    # lengths
    ("length in 5 bytes (over-long)", T(100, 2) + vf.overlong(2, 5) + b"ab", True),
    ("length in 6 bytes (over-long)", T(100, 2) + vf.overlong(2, 6) + b"ab", False),
    ("message length in 6 bytes", T(1, 2) + vf.overlong(0, 6), False),
    ("length past the end", T(100, 2) + V(5) + b"abc", False),
    ("length 2^31 - 1", T(100, 2) + V(2**31 - 1), False),
    ("length 2^32 + 2 (5 bytes, no 32-bit truncation)",
     T(100, 2) + b"\x82\x80\x80\x80\x10" + b"ab", False),
    ("length 2^63", T(100, 2) + V(1 << 63), False),
    ("a field past its message's end", L(1, T(100, 2) + V(3) + b"a") + b"bc", False),
    # fixed
    ("fixed64 cut short", T(100, 1) + b"\x00" * 7, False),
    ("fixed32 cut short", T(100, 5) + b"\x00" * 3, False),
    ("known fixed64 cut short", _in_span(T(7, 1) + b"\x00" * 7), False),
    # known fields with another wire type: unknown fields
    ("known string field as a varint", _in_span(T(5, 0) + b"\x01"), True),
    ("known fixed64 field as length-delimited", _in_span(L(7, b"\xff")), True),
    ("known enum field as length-delimited, bad varint inside", _in_span(L(6, b"\xff")), True),
    ("known message field as a varint", _in_any(T(5, 0) + b"\x01"), True),
    ("known bool field as length-delimited", _in_any(L(2, b"\xff")), True),
    ("known message field, malformed inside", _in_any(L(5, b"\xff")), False),
    ("unknown field, malformed inside", _in_any(L(99, b"\xff")), True),
    # groups
    ("group", _group(100, T(1, 0) + b"\x01"), True),
    ("nested groups", _group(100, _group(5)), True),
    ("known message field as a group", _group(1, T(7, 0) + b"\x01"), True),
    ("group closed by another field's end", T(100, 3) + T(101, 4), False),
    ("groups closed in the wrong order", T(100, 3) + T(5, 3) + T(100, 4) + T(5, 4), False),
    ("unterminated group", T(100, 3) + T(1, 0) + b"\x01", False),
    ("end-group alone", T(100, 4), False),
    ("end-group of field 0 alone", b"\x04", False),
    ("field number 0 inside a group", _group(100, b"\x00\x05"), True),
    ("a group of field 0 inside a group", _group(100, b"\x03\x04"), True),
    ("group opened by field 0", b"\x03\x04", False),
    ("group closed by field 0's end", T(100, 3) + b"\x04", False),
    ("end-group tag over-long (3 bytes)", T(100, 3) + vf.overlong(100 << 3 | 4, 3), True),
    ("end-group tag in 6 bytes", T(100, 3) + vf.overlong(100 << 3 | 4, 6), False),
    ("tag in 6 bytes inside a group", _group(100, vf.overlong(5 << 3, 6) + b"\x01"), False),
    ("varint in 11 bytes inside a group", _group(100, T(5, 0) + vf.overlong(1, 11)), False),
    ("length in 6 bytes inside a group", _group(100, T(5, 2) + vf.overlong(0, 6)), False),
    ("wire type 7 inside a group", _group(100, T(5, 7)), False),
    ("group open at the end of its message", _in_span(T(100, 3)), False),
    ("end-group inside a span", _in_span(T(100, 4)), False),
    ("group across a message's end", L(1, L(2, L(2, T(100, 3)) + T(100, 4))), False),
    # UTF-8: string fields only
    ("span name not UTF-8", _in_span(L(5, b"\xff")), False),
    ("span name over-long NUL", _in_span(L(5, b"\xc0\x80")), False),
    ("span name surrogate", _in_span(L(5, b"\xed\xa0\x80")), False),
    ("span name past U+10FFFF", _in_span(L(5, b"\xf4\x90\x80\x80")), False),
    ("span name U+10FFFF", _in_span(L(5, b"\xf4\x8f\xbf\xbf")), True),
    ("span name NUL", _in_span(L(5, b"\x00")), True),
    ("span name cut multi-byte", _in_span(L(5, b"\xe2\x82")), False),
    ("trace id not UTF-8 (bytes)", _in_span(L(1, b"\xff")), True),
    ("bytes_value not UTF-8", _in_any(L(7, b"\xff")), True),
    ("string_value not UTF-8", _in_any(L(1, b"\xff")), False),
    ("string_value not UTF-8, then an int_value", _in_any(L(1, b"\xff") + T(3, 0) + b"\x01"),
     False),
    ("string field as fixed32, not UTF-8", _in_any(T(1, 5) + b"\xff" * 4), True),
    ("attribute key not UTF-8", _in_span(L(9, L(1, b"\xff"))), False),
    ("kvlist key not UTF-8", _in_any(L(6, L(1, L(1, b"\xff")))), False),
    ("event name not UTF-8", _in_span(L(11, L(2, b"\xff"))), False),
    ("link trace_state not UTF-8", _in_span(L(13, L(3, b"\xff"))), False),
    ("link trace_id not UTF-8 (bytes)", _in_span(L(13, L(1, b"\xff"))), True),
    ("status message not UTF-8", _in_span(L(15, L(2, b"\xff"))), False),
    ("scope name not UTF-8", L(1, L(2, L(1, L(1, b"\xff")))), False),
    ("resource spans schema_url not UTF-8", L(1, L(3, b"\xff")), False),
    ("entity ref id_keys not UTF-8", L(1, L(1, L(3, L(3, b"\xff")))), False),
    ("not UTF-8 inside an unknown field", _in_span(L(99, L(5, b"\xff"))), True),
    # depth: the request is level 0; messages and groups one level each
    ("messages to level 100", _nested(100), True),
    ("messages to level 101", _nested(101), False),
    ("100 nested groups", _groups(100), True),
    ("101 nested groups", _groups(101), False),
    ("101 nested groups of a known field", _groups(101, 1), False),
    ("level 50 message, 50 groups", _nested(50, _groups(50)), True),
    ("level 50 message, 51 groups", _nested(50, _groups(51)), False),
    ("level 100 message, one group", _nested(100, _groups(1)), False),
]


@pytest.mark.parametrize(("name", "raw", "want"), RULES, ids=[r[0] for r in RULES])
def test_upb_rule(name: str, raw: bytes, want: bool) -> None:
    native = native_build.require_native()
    upb, compiled = nc.protobuf_accepts(raw), native.validate_traces(raw)[0]
    assert upb is want, f"protobuf no longer behaves so: {name}"
    assert compiled is want, name


def test_deep_unknown_fields_are_not_looked_into() -> None:
    """Nesting past the limit inside an unknown field's bytes: upb never parses them."""
    native = native_build.require_native()
    inner = b"x"
    for _ in range(300):
        inner = vf.ld(99, inner)
    raw = _in_span(inner)
    upb, compiled = nc.protobuf_accepts(raw), native.validate_traces(raw)[0]
    assert upb is True and compiled is True


def test_span_counts_and_threads() -> None:
    """The count is protobuf's; calls from threads (the GIL is released) agree."""
    native = native_build.require_native()
    from concurrent.futures import ThreadPoolExecutor

    raws = [c.raw for c in vf.cases(SEED, 300)]
    alone = [native.validate_traces(r) for r in raws]
    for i, (raw, (ok, n)) in enumerate(zip(raws, alone, strict=True)):
        same = ok is nc.protobuf_accepts(raw) and (not ok or n == vf.span_count(raw))
        assert same, f"seed {SEED} case {i}"
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(native.validate_traces, raws * 4))
    same = together == alone * 4
    assert same, "calls from threads disagree"


# ------------------------------------------------------------------------------------------
# 3. mutated requests, in subprocesses


def _asan_build(out_dir: Path) -> tuple[Path, str] | None:
    """The extension built with AddressSanitizer and UBSan, and the runtime to preload; None
    where that cannot be built here (an extra check)."""
    cc = native_build.compiler()
    if not cc:
        return None
    try:
        lib = subprocess.run([*shlex.split(cc), "-print-file-name=libasan.so"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    runtime = lib.stdout.strip()
    if lib.returncode != 0 or not os.path.isabs(runtime) or not os.path.exists(runtime):
        return None
    out = native_build.sanitized_build(out_dir, "address,undefined")
    return (out, runtime) if out is not None else None


def _summary(name: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=240)
    tail = "\n".join(err.strip().splitlines()[-25:])
    assert proc.returncode >= 0, f"{name}: killed by signal {-proc.returncode}\n{tail}"
    lines = out.strip().splitlines()
    assert lines, f"{name}: no summary (exit {proc.returncode})\n{tail}"
    summary: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["disagreement_count"] == 0, \
        f"{name}: exit {proc.returncode}\n" + "\n".join(summary.get("disagreements", [])) \
        + f"\n{tail}"
    return summary


def test_validator_agrees_with_protobuf_on_mutated_requests(tmp_path: Path) -> None:
    native_build.require_native()
    fuzz = [sys.executable, "-m", "tests.receiver.validate_fuzz"]
    n = int(20_000 * SCALE)
    procs = {"validate_fuzz": subprocess.Popen(
        [*fuzz, "--seed", str(SEED), "--cases", str(n)], cwd=ROOT, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    # every input in a buffer of exactly its size, under AddressSanitizer: no read past it
    asan = _asan_build(tmp_path)
    if asan is not None:
        so, runtime = asan
        env = cli_env(NATIVE_TEST_SO=str(so), LD_PRELOAD=runtime, PYTHONMALLOC="malloc",
                      ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                      UBSAN_OPTIONS="print_stacktrace=1:abort_on_error=1")
        procs["validate_fuzz under AddressSanitizer"] = subprocess.Popen(
            [*fuzz, "--seed", str(SEED + 1), "--cases", str(int(3000 * SCALE)),
             "--exact-buffers"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    try:
        results = {name: _summary(name, proc) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    s = results["validate_fuzz"]
    assert s["cases"] == n
    # both verdicts, well represented, from every kind of mutation
    assert s["accepted"] > 0.15 * n and s["refused"] > 0.15 * n, (s["accepted"], s["refused"])
    for kind in vf.KINDS:
        assert s.get(f"{kind}.accepted", 0) > 20 * SCALE, f"{kind}: too few accepted"
        assert s.get(f"{kind}.refused", 0) > 20 * SCALE, f"{kind}: too few refused"
    assert s["seed.accepted"] > 10 and "seed.refused" not in s


# ------------------------------------------------------------------------------------------
# 4. end to end


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(time, "time_ns", lambda: nc.NOW_US * 1000 + 123)
    yield


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The protobuf parses ``RequestProcessor`` makes (the signal of each)."""
    calls: list[str] = []
    real = _process._parse

    def counting(signal: str, raw: bytes) -> Any:
        calls.append(signal)
        return real(signal, raw)

    monkeypatch.setattr(_process, "_parse", counting)
    return calls


def _outcome(proc: RequestProcessor, raw: bytes) -> Any:
    try:
        return proc.process("traces", raw, "sender")
    except MalformedRequest:
        return "malformed"


def _rows(audit: Any) -> list[dict[str, Any]]:
    if isinstance(audit, pa.Table):
        return nc.table_rows(audit)
    return [dict(zip(nc.NAMES, row, strict=True)) for row in audit]


def test_processor_refuses_what_protobuf_refuses_and_maps_the_rest_as_before(
        keys: nc.Keys, fixed_clock: None, parses: list[str]) -> None:
    """Through ``RequestProcessor``: a request protobuf refuses is ``MalformedRequest``
    without a protobuf parse; one it accepts gives the rows, trace rows, infra rows and stats
    of the processor without the compiled path; protobuf parses it only when spans are left
    to the Python path."""
    sensitive = ["http.request.header.authorization", "app.*"]
    native = native_for(keys.ring)
    assert native is not None and native.validates
    fast = RequestProcessor(keys.encoder, Extractor(sensitive), native=native)
    slow = RequestProcessor(keys.encoder, Extractor(sensitive), native=None)
    inputs = [(f"seed {SEED} case {c.index}", c.raw)
              for c in vf.cases(SEED + 3, int(600 * SCALE))]
    inputs += [(f"corpus seed {SEED + 4} request {i}", r.raw)
               for i, r in enumerate(nc.corpus(SEED + 4, int(60 * SCALE)))]
    rng = random.Random(SEED + 5)
    inputs += [(f"audit seed {SEED + 5} request {i}", vf.audit_request(rng))
               for i in range(int(40 * SCALE))]
    counts = {"malformed": 0, "no_parse": 0, "lazy_parse": 0}
    for where, raw in inputs:
        before = len(parses)
        a = _outcome(fast, raw)
        fast_parses = len(parses) - before
        b = _outcome(slow, raw)
        fast_refused, slow_refused = a == "malformed", b == "malformed"
        upb_refuses = not nc.protobuf_accepts(raw)
        assert fast_refused is slow_refused is upb_refuses, \
            f"{where}: refused: compiled {fast_refused}, Python {slow_refused}, " \
            f"protobuf {upb_refuses}"
        if fast_refused:
            assert fast_parses == 0, f"{where}: protobuf parsed a refused request"
            counts["malformed"] += 1
            continue
        try:  # its messages quote values: only say where
            nc.compare_rows(keys, _rows(b.audit_rows), _rows(a.audit_rows), where)
        except AssertionError:
            raise AssertionError(f"{where}: audit rows differ") from None
        same_traces = a.trace_rows == b.trace_rows
        same_infra = nc.clear_infra(keys, a.infra_rows) == nc.clear_infra(keys, b.infra_rows)
        same_rollups = a.rollup_rows == b.rollup_rows
        assert same_traces and same_infra and same_rollups, \
            f"{where}: trace {same_traces}, infra {same_infra}, rollups {same_rollups}"
        sa = dict(a.stats)
        took = sa.pop("native_spans", 0)
        same_stats = sa == b.stats
        assert same_stats, f"{where}: stats differ in " + ", ".join(
            sorted(k for k in {*sa, *b.stats} if sa.get(k) != b.stats.get(k)))
        # no parse when the compiled extractor took every span (of an empty request too, when
        # it took the request), one otherwise
        if took and took == sa["spans"]:
            assert fast_parses == 0, f"{where}: every span taken, yet protobuf parsed it"
            counts["no_parse"] += 1
        elif sa["spans"]:
            assert fast_parses == 1, f"{where}: {fast_parses} protobuf parses"
            counts["lazy_parse"] += 1
        else:
            assert fast_parses <= 1, where
    assert fast.native_failures == 0
    assert counts["malformed"] > 100 * SCALE, counts
    assert counts["no_parse"] > 40 * SCALE, counts
    assert counts["lazy_parse"] > 40 * SCALE, counts


def test_audit_only_request_is_never_parsed_by_protobuf(keys: nc.Keys,
                                                        parses: list[str]) -> None:
    native = native_for(keys.ring)
    proc = RequestProcessor(keys.encoder, Extractor([]), native=native)
    tid = new_trace_id()
    raw = trace_request([audit_span(tid, f"syn-val-{i}") for i in range(5)])
    done = proc.process("traces", raw, "anonymous")
    assert done.stats["native_spans"] == 5 and len(done.audit_rows) == 5
    assert parses == []
    # one span left to Python: one parse, and the rows of all six
    mixed = trace_request([*(audit_span(tid, f"syn-val-{i}") for i in range(5)),
                           span(tid, {"http.route": "/health"})])
    done = proc.process("traces", mixed, "anonymous")
    assert done.stats["native_spans"] == 5 and done.stats["spans"] == 6
    assert parses == ["traces"]
    with pytest.raises(MalformedRequest):
        proc.process("traces", raw[:-1], "anonymous")
    assert parses == ["traces"]


def test_without_compiled_validation_protobuf_decides(keys: nc.Keys,
                                                      parses: list[str]) -> None:
    """Where the validator does not match protobuf (another opentelemetry-proto, another
    runtime), every trace request is parsed first, as before; logs always are."""
    native = native_for(keys.ring)
    assert native is not None
    native.validates = False
    proc = RequestProcessor(keys.encoder, Extractor([]), native=native)
    raw = trace_request([audit_span(new_trace_id(), "syn-val-x")])
    assert len(proc.process("traces", raw, "anonymous").audit_rows) == 1
    assert parses == ["traces"]
    with pytest.raises(MalformedRequest):
        proc.process("traces", raw + b"\x00", "anonymous")
    with pytest.raises(MalformedRequest):
        proc.process("logs", logs_request([logs_pb2.LogRecord()]) + b"\x07", "anonymous")
    assert parses == ["traces", "traces", "logs"]
