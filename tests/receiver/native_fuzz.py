"""Untrusted bytes into the compiled extractor, in a process of its own (a crash is a failed
test, not a dead pytest). Run by ``tests/receiver/test_native.py``::

    python -m tests.receiver.native_fuzz --data-dir DIR [--seed N] [--scale F]

Feeds ``_native.extract`` truncations of valid requests at every length, structure-aware
mutations (a field of some nested message duplicated, dropped, moved, retyped, re-valued or
given interesting text, the enclosing lengths re-framed so that protobuf often still accepts
it), byte flips / insertions / deletions, random bytes, and hand-made wire oddities at every
nesting level (11-byte varints, wire types 3/4/6/7, field number 0, huge or negative lengths,
deep nesting, huge counts). Every call must return None or a well-formed result; whenever the
protobuf runtime accepts the bytes and the result is not None, the rows must equal the Python
reference's (``native_corpus.differential``). Prints one JSON summary line; exits 1 on any
failure (the failing inputs are saved under ``DIR/failures``).

``NATIVE_TEST_SO=path`` loads another build of the extension (an ASan build, say) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from tests.receiver.native_build import use_test_so

if os.environ.get("NATIVE_TEST_SO"):  # before anything imports phiaudit.receiver._fast
    use_test_so()


from phiaudit.receiver import _fast
from tests.receiver import native_corpus as nc

try:
    from phiaudit.receiver import _native  # type: ignore[attr-defined]
except ImportError:  # not built: main() says so
    _native = None

KEY = bytes(range(32))
INTERESTING = [b"phi.audit.event", b"phi.audit.action", b"phi.audit.outcome", b"phi.patient.id",
               b"user.roles", b"enduser.role", b"http.response.status_code",
               b"http.status_code", b"phi.record.count", b"enduser.id", b"phi.access",
               b"exception", b"db.system", b"span.name", b"service.name", b"host.name",
               b"device.id", b"true", b"TRUE", b"read", b"READ", b"success", b" ok", b"",
               b"\x00", "é".encode(), b"\\\"", b"a,b", b"phi.query", b"client.address"]
EXTREME_VARINTS = [0, 1, 2, 127, 128, 400, 999, 1000, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
                   1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 946_684_800_000_000_000,
                   (1 << 32) + 2, (1 << 64) - (1 << 32) + 2, 256]  # int32 / bool truncations


# ------------------------------------------------------------------------------------------
# a lenient wire parser (for structure-aware mutation)


def parse_fields(b: bytes) -> list[list[Any]] | None:
    out: list[list[Any]] = []
    i = 0
    while i < len(b):
        r = nc.read_varint(b, i)
        if r is None:
            return None
        key, i = r
        fno, wt = key >> 3, key & 7
        if fno == 0:
            return None
        if wt == 0:
            r = nc.read_varint(b, i)
            if r is None:
                return None
            v, i = r
            out.append([fno, 0, v])
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            if i + n > len(b):
                return None
            out.append([fno, wt, b[i:i + n]])
            i += n
        elif wt == 2:
            r = nc.read_varint(b, i)
            if r is None or r[1] + r[0] > len(b):
                return None
            n, i = r
            out.append([fno, 2, b[i:i + n]])
            i += n
        else:
            return None
    return out


def overlong(n: int, pad: int) -> bytes:
    """A varint with ``pad`` redundant bytes (a non-minimal encoding protobuf accepts)."""
    b = bytearray(nc.varint(n))
    pad = min(pad, 10 - len(b))  # at most 10 bytes: a longer one is not a varint any more
    if pad:
        b[-1] |= 0x80
        b += b"\x80" * (pad - 1) + b"\x00"
    return bytes(b)


def encode_fields(fields: list[list[Any]]) -> bytes:
    out = bytearray()
    for f in fields:
        fno, wt, v = f[:3]
        pad = f[3] if len(f) > 3 else 0
        out += overlong(fno << 3 | wt, pad)
        if wt == 0:
            out += overlong(v, pad)
        elif wt == 2:
            out += overlong(len(v), pad) + v
        else:
            out += v
    return bytes(out)


def byte_mutate(b: bytes, rng: random.Random) -> bytes:
    a = bytearray(b)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        pos = rng.randint(0, len(a))
        if op < 0.3 and a:
            p = min(pos, len(a) - 1)
            a[p] ^= 1 << rng.randint(0, 7)
        elif op < 0.45 and a:
            a[min(pos, len(a) - 1)] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randint(0, 255)])
        elif op < 0.65:
            a[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op < 0.85 and a:
            del a[pos:pos + rng.randint(1, 16)]
        elif a:
            start = rng.randint(0, len(a) - 1)
            chunk = a[start:start + rng.randint(1, 32)]
            a[pos:pos] = chunk
    return bytes(a)


def field_mutate(fields: list[list[Any]], rng: random.Random) -> None:
    op = rng.randrange(10)
    i = rng.randrange(len(fields))
    f = fields[i]
    if op == 9:  # tag, length or value in a non-minimal encoding
        fields[i] = [*f[:3], rng.randint(1, 3)]
    elif op == 0:  # a field twice
        fields.insert(rng.randint(0, len(fields)), list(f))
    elif op == 1:  # a field dropped
        del fields[i]
    elif op == 2:  # fields out of order
        j = rng.randrange(len(fields))
        fields[i], fields[j] = fields[j], fields[i]
    elif op == 3 and f[1] == 0:  # an extreme varint
        f[2] = rng.choice(EXTREME_VARINTS)
    elif op == 4:  # another wire type for the same field
        wt = rng.choice([0, 1, 2, 5])
        val: Any = {0: rng.choice(EXTREME_VARINTS), 1: rng.randbytes(8), 5: rng.randbytes(4),
                    2: rng.choice(INTERESTING)}[wt]
        fields[i] = [f[0], wt, val]
    elif op == 5:  # an unknown or another field number
        fields.insert(rng.randint(0, len(fields)),
                      [rng.choice([rng.randint(1, 20), rng.randint(21, 5000)]), 2,
                       rng.choice(INTERESTING)])
    elif op == 6 and f[1] == 2:  # interesting text
        f[2] = rng.choice(INTERESTING)
    elif op == 7:
        f[0] = rng.randint(1, 16)
    elif f[1] == 2:
        f[2] = byte_mutate(f[2], rng)


def structured_mutate(b: bytes, rng: random.Random, depth: int = 0) -> bytes:
    fields = parse_fields(b)
    if not fields:
        return byte_mutate(b, rng)
    nested = [i for i, f in enumerate(fields) if f[1] == 2 and f[2] and parse_fields(f[2])]
    if nested and depth < 10 and rng.random() < 0.8:
        i = rng.choice(nested)
        fields[i][2] = structured_mutate(fields[i][2], rng, depth + 1)
    else:
        field_mutate(fields, rng)
    return encode_fields(fields)


# ------------------------------------------------------------------------------------------
# checks


def check_shape(out: Any, raw_len: int) -> int:
    """None or a well-formed (rows, ords, columns, spans); returns the number of rows."""
    if out is None:
        return 0
    assert isinstance(out, tuple) and len(out) == 4, "not a 4-tuple"
    n, ords, cols, spans = out
    assert isinstance(n, int) and n >= 0
    assert isinstance(spans, int) and spans >= 0
    assert isinstance(ords, bytes) and len(ords) % 4 == 0
    o = memoryview(ords).cast("i").tolist()
    assert o == sorted(set(o)) and all(x >= 1 for x in o), "ordinals not increasing"
    assert len(o) <= n, "an ordinal without a row"
    assert not o or o[-1] <= spans, "an ordinal past the span count"
    layouts = list(_native.LAYOUTS)
    assert isinstance(cols, tuple) and len(cols) == len(layouts)
    widths = {"f16": 16, "f32": 32, "i64": 8, "u64": 8, "u32": 4, "u16": 2}
    for layout, c in zip(layouts, cols, strict=True):
        assert isinstance(c, tuple) and len(c) == 3 and all(isinstance(x, bytes) for x in c)
        data, offs, child = c
        if layout in widths:
            assert len(data) == n * widths[layout] and not offs and not child, layout
            continue
        off = memoryview(offs).cast("i").tolist()
        assert len(off) == n + 1 and off[0] == 0 and off == sorted(off), layout
        if layout == "b":
            assert off[-1] == len(data) and not child
        else:
            co = memoryview(child).cast("i").tolist()
            assert co and co[0] == 0 and co == sorted(co) and co[-1] == len(data)
            assert off[-1] == len(co) - 1
    return n


class Fuzz:
    def __init__(self, keys: nc.Keys, out_dir: Path, deadline: float) -> None:
        self.keys = keys
        self.out_dir = out_dir
        self.deadline = deadline
        self.stats: Counter[str] = Counter()
        self.failures: list[str] = []
        self.python_errors: Counter[str] = Counter()
        self.slow: list[str] = []

    def save(self, raw: bytes, why: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        p = self.out_dir / f"failure-{len(self.failures)}.bin"
        p.write_bytes(raw)
        self.failures.append(f"{why} (input saved as {p})")

    def validated(self, raw: bytes, phase: str, accepted: bool) -> None:
        """The compiled validator (alone, and in front of the extractor) gives protobuf's
        verdict, and the extractor then returns no rows for what protobuf refuses."""
        self.stats["validator.checked"] += 1
        self.stats["validator.accepts" if accepted else "validator.refuses"] += 1
        verdict, spans = _native.validate_traces(raw)
        if verdict is not accepted:
            self.save(raw, f"{phase}: the compiled validator says {verdict}, protobuf "
                      f"{accepted}")
            return
        try:
            out = _native.extract(raw, nc.NOW_US, b"fuzz", 7, KEY, KEY, 0, True)
            if out is not False:
                check_shape(out, len(raw))
        except AssertionError as exc:
            self.save(raw, f"{phase}: malformed result (validating): {exc}")
            return
        except MemoryError:
            return
        if (out is False) is accepted:
            self.save(raw, f"{phase}: extract(validate) gave {out is not False}, protobuf "
                      f"{accepted}")
        elif out and out[3] != spans:
            self.save(raw, f"{phase}: extract counts {out[3]} spans, the validator {spans}")

    def one(self, raw: bytes, phase: str, compare: bool = True, slow_s: float = 2.0,
            sample: int = 1) -> None:
        """One call; compared with Python when protobuf accepts the bytes (every
        ``sample``-th such input of the phase, while the time budget lasts)."""
        self.stats[f"{phase}.calls"] += 1
        t = time.perf_counter()
        try:
            out = _native.extract(raw, nc.NOW_US, b"fuzz", 7, KEY, KEY)
            check_shape(out, len(raw))
        except AssertionError as exc:
            self.save(raw, f"{phase}: malformed result: {exc}")
            return
        except MemoryError:
            self.stats[f"{phase}.memory_error"] += 1
            return
        dt = time.perf_counter() - t
        if dt > slow_s:
            self.slow.append(f"{phase}: {len(raw)} bytes took {dt:.2f} s")
        self.stats[f"{phase}.none" if out is None else f"{phase}.tuple"] += 1
        accepted = nc.protobuf_accepts(raw)
        self.validated(raw, phase, accepted)
        if out is None or not compare:
            return
        if not accepted:
            self.stats[f"{phase}.protobuf_rejects"] += 1
            if out[0]:
                self.stats[f"{phase}.rows_where_protobuf_rejects"] += 1
            return
        self.stats[f"{phase}.protobuf_accepts"] += 1
        if self.stats[f"{phase}.protobuf_accepts"] % sample:
            return
        if time.monotonic() > self.deadline:
            self.stats[f"{phase}.compare_skipped_time"] += 1
            return
        try:
            res = nc.differential(self.keys, raw, phase)
        except AssertionError as exc:
            self.save(raw, f"{phase}: differs from the Python reference: {exc}")
            return
        except Exception as exc:
            # the Python path itself failed on bytes protobuf accepts: not the compiled
            # path's fault, but reported
            self.python_errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            self.save(raw, f"{phase}: Python path raised {type(exc).__name__}")
            return
        self.stats[f"{phase}.compared"] += 1
        self.stats["native_spans_compared"] += len(res.taken)


# ------------------------------------------------------------------------------------------
# hand-made oddities

BAD_CHUNKS: list[tuple[str, bytes]] = [
    ("varint11-tag", b"\x80" * 10 + b"\x01"),
    ("varint11-value", nc.tag(1, 0) + b"\xff" * 10 + b"\x01"),
    ("varint10-highbits", nc.tag(200, 0) + b"\xff" * 9 + b"\x7f"),
    ("varint-unterminated", nc.tag(200, 0) + b"\xff\xff"),
    ("field0-varint", b"\x00\x00"),
    ("field0-len", b"\x02\x00"),
    ("max-field", nc.tag((1 << 29) - 1, 0) + b"\x00"),
    ("field-2^29", nc.varint(((1 << 29) << 3) | 0) + b"\x00"),
    ("field-2^32", nc.varint(((1 << 32) + 1 << 3) | 2) + b"\x00"),
    ("len-2^31", nc.tag(100, 2) + nc.varint(1 << 31)),
    ("len-2^32+1", nc.tag(100, 2) + nc.varint((1 << 32) + 1) + b"x"),
    ("len-2^63", nc.tag(100, 2) + nc.varint(1 << 63)),
    ("len-negative", nc.tag(100, 2) + b"\xff" * 9 + b"\x01"),
    ("len-past-end", nc.tag(100, 2) + nc.varint(5) + b"abc"),
    ("fixed64-short", nc.tag(7, 1) + b"\x00\x00\x00"),
    ("fixed32-short", nc.tag(100, 5) + b"\x00"),
    ("tag-only", nc.tag(2, 2)),
]
for _f in (1, 2, 9, 100):
    for _wt in (3, 4, 6, 7):
        BAD_CHUNKS.append((f"wt{_wt}-field{_f}", nc.tag(_f, _wt) + b"\x00"))
BAD_CHUNKS.append(("group-pair", nc.tag(100, 3) + nc.tag(1, 0) + b"\x01" + nc.tag(100, 4)))
BAD_CHUNKS.append(("group-pair-field2", nc.tag(2, 3) + nc.tag(2, 4)))


def paths(raw: bytes) -> list[list[int]]:
    """Index paths to every nested message of a request (by the lenient parser)."""
    out: list[list[int]] = [[]]

    def walk(b: bytes, path: list[int], depth: int) -> None:
        fields = parse_fields(b)
        if not fields or depth > 8:
            return
        for i, f in enumerate(fields):
            if f[1] == 2 and f[2] and parse_fields(f[2]):
                out.append([*path, i])
                walk(f[2], [*path, i], depth + 1)

    walk(raw, [], 0)
    return out


def inject(raw: bytes, path: list[int], chunk: bytes, at_end: bool) -> bytes:
    if not path:
        return raw + chunk if at_end else chunk + raw
    fields = parse_fields(raw)
    assert fields is not None
    i = path[0]
    fields[i][2] = inject(fields[i][2], path[1:], chunk, at_end)
    return encode_fields(fields)


def nested_any(depth: int) -> bytes:
    """An AnyValue of arrays nested ``depth`` deep (protobuf refuses past its recursion limit;
    the compiled walker must not care)."""
    inner = nc.ld(1, b"pat-deep")
    for _ in range(depth):
        inner = nc.ld(5, nc.ld(1, inner))
    return inner


def audit_span_with(attr_bytes: bytes) -> bytes:
    span = (nc.ld(1, b"\x01" * 16) + nc.ld(2, b"\x02" * 8) + nc.ld(5, b"n")
            + nc.fixed64(7, nc.NOW_US * 1000)
            + nc.ld(9, nc.ld(1, b"phi.audit.event") + nc.ld(2, nc.tag(2, 0) + b"\x01"))
            + attr_bytes)
    return nc.ld(1, nc.ld(2, nc.ld(2, span)))


def edge_cases() -> list[tuple[str, bytes]]:
    """Small valid requests at the edges of the wire format (compared with Python)."""
    keyless = nc.ld(9, b"")  # a KeyValue without key nor value
    keyless_v = nc.ld(9, nc.ld(2, nc.ld(1, b"v")))  # a value, no key
    empty_key = nc.ld(9, nc.ld(1, b"") + nc.ld(2, nc.ld(1, b"w")))  # the key "" on the wire
    span = parse_inner(audit_span_with(b""))
    good = nc.ld(1, nc.ld(1, b"service.name") + nc.ld(2, nc.ld(1, b"good")))
    cases = [
        ("two-keyless-attrs", audit_span_with(keyless + keyless)),
        ("keyless-with-values", audit_span_with(keyless_v + keyless_v)),
        ("keyless-and-empty-key", audit_span_with(keyless_v + empty_key)),
        ("one-keyless-attr", audit_span_with(keyless_v)),
        ("keyless-resource-attrs", nc.ld(1, nc.ld(1, nc.ld(1, b"") * 3) + span)),
        ("empty-request", b""),
        ("empty-resource-spans", nc.ld(1, b"")),
        ("empty-span", nc.ld(1, nc.ld(2, nc.ld(2, b"")))),
        ("empty-anyvalue-audit", audit_span_with(nc.ld(9, nc.ld(1, b"phi.patient.id")))),
        ("empty-array-patients", audit_span_with(
            nc.ld(9, nc.ld(1, b"phi.patient.id") + nc.ld(2, nc.ld(5, b""))))),
        ("1000-patients", audit_span_with(nc.ld(9, nc.ld(1, b"phi.patient.id") + nc.ld(2, nc.ld(
            5, b"".join(nc.ld(1, nc.ld(1, b"p%d" % i)) for i in range(1000))))))),
        ("status-code-2-plus-2^32", audit_span_with(nc.ld(15, nc.tag(3, 0) + nc.varint(
            (1 << 32) + 2)))),
        ("bool-256", audit_span_with(nc.ld(9, nc.ld(1, b"app.flag") + nc.ld(
            2, nc.tag(2, 0) + nc.varint(256))))),
        ("array-of-empty-anyvalues", audit_span_with(
            nc.ld(9, nc.ld(1, b"phi.patient.id") + nc.ld(2, nc.ld(5, nc.ld(1, b"") * 3))))),
    ]
    # resource attributes whose key field comes twice (protobuf keeps the last key), or whose
    # value comes twice (protobuf merges the values)
    for k in (b"service.name", b"host.name", b"device.id"):
        for kv in (nc.ld(1, b"x") + nc.ld(1, k) + nc.ld(2, nc.ld(1, b"evil")),
                   nc.ld(1, k) + nc.ld(1, b"x") + nc.ld(2, nc.ld(1, b"evil")),
                   nc.ld(1, k) + nc.ld(2, nc.ld(1, b"a")) + nc.ld(2, nc.ld(1, b"b"))):
            cases.append((f"resource-{k.decode()}-twice",
                          nc.ld(1, nc.ld(1, good + nc.ld(1, kv)) + span)))
    return cases


def huge_cases() -> list[tuple[str, bytes, float]]:
    """Large inputs, with the time each may take (generous; linear work is ~1000x below).
    The 10k-patients case must give 10 000 rows; the 10 001 one none (Python truncates)."""
    cases = []
    # many resource attributes before one audit span: all with the key "", and without a key
    # (the pairwise duplicate check once took 8 s and 6 s for these, minutes at 16 MB)
    span = parse_inner(audit_span_with(b""))
    res = nc.ld(1, nc.ld(1, nc.ld(1, b"")) * 80_000)
    cases.append(("resource-80k-attrs", nc.ld(1, res + span), 1.5))
    res = nc.ld(1, nc.ld(1, b"") * 10_000)
    cases.append(("resource-10k-keyless-attrs", nc.ld(1, res + span), 1.5))
    # one span with a million attributes
    cases.append(("span-1M-attrs", audit_span_with(nc.ld(9, b"") * 1_000_000), 1.5))
    # 500k empty spans, and 200k scopes
    cases.append(("500k-spans", nc.ld(1, nc.ld(2, nc.ld(2, b"") * 500_000)), 1.5))
    cases.append(("200k-scopes", nc.ld(1, nc.ld(2, b"") * 200_000), 1.5))
    # a patient list of 10k (the limit) and of 10k + 1 ids; 200k events
    ids = b"".join(nc.ld(1, nc.ld(1, b"p%d" % i)) for i in range(10_000))
    pat = nc.ld(9, nc.ld(1, b"phi.patient.id") + nc.ld(2, nc.ld(5, ids)))
    cases.append(("10k-patients", audit_span_with(pat), 5.0))
    ids1 = ids + nc.ld(1, nc.ld(1, b"one more"))
    pat1 = nc.ld(9, nc.ld(1, b"phi.patient.id") + nc.ld(2, nc.ld(5, ids1)))
    cases.append(("10001-patients", audit_span_with(pat1), 5.0))
    cases.append(("200k-events", audit_span_with(nc.ld(11, nc.ld(2, b"e")) * 200_000), 1.5))
    # deep nesting: in a mapped list attribute, and in an unknown field
    deep = nc.ld(9, nc.ld(1, b"phi.patient.id") + nc.ld(2, nested_any(20_000)))
    cases.append(("deep-anyvalue", audit_span_with(deep), 1.5))
    unknown = b"x"
    for _ in range(20_000):
        unknown = nc.ld(100, unknown)
    cases.append(("deep-unknown", audit_span_with(unknown), 1.5))
    # a huge attribute value (1 MiB of JSON specials) and a huge key
    big = ('"\\\x01é' * (1 << 18)).encode()
    cases.append(("1MiB-value", audit_span_with(
        nc.ld(9, nc.ld(1, b"app.big") + nc.ld(2, nc.ld(1, big)))), 1.5))
    cases.append(("1MiB-key", audit_span_with(
        nc.ld(9, nc.ld(1, big) + nc.ld(2, nc.ld(1, b"v")))), 1.5))
    return cases


def parse_inner(request_bytes: bytes) -> bytes:
    """The payload of a request's single ResourceSpans."""
    fields = parse_fields(request_bytes)
    assert fields and len(fields) == 1
    return bytes(fields[0][2])


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the work")
    p.add_argument("--seconds", type=float, default=15.0, help="time budget of comparisons")
    args = p.parse_args(argv)
    ok, why = _fast.native_available()
    if not ok:
        print(json.dumps({"error": why}))
        return 2
    started = time.monotonic()
    keys = nc.Keys.open(args.data_dir / "ring")
    fz = Fuzz(keys, args.data_dir / "failures", started)

    def budget(share: float) -> None:  # each phase's share of the comparison time
        fz.deadline = time.monotonic() + share * args.seconds
    rng = random.Random(args.seed)
    scale = args.scale

    # seeds: small requests of every shape (the mutations start from these)
    seeds = [nc.make_request(rng, max_spans=3).raw for _ in range(int(40 * scale) + 4)]
    seeds = [s for s in seeds if 0 < len(s) < 6000] or seeds[:1]

    # 0. edge cases, every one compared
    fz.deadline = time.monotonic() + 60
    for name, raw in edge_cases():
        fz.one(raw, f"edge.{name}")

    # 1. truncations at every length
    budget(0.1)
    for raw in sorted(seeds, key=len)[-3:]:
        for n in range(len(raw) + 1):
            fz.one(raw[:n], "truncate")

    # 2. hand-made oddities at every nesting level of a few requests, front and back
    budget(0.25)
    for raw in seeds[:3]:
        for path in paths(raw):
            for name, chunk in BAD_CHUNKS:
                for at_end in (False, True):
                    fz.one(inject(raw, path, chunk, at_end), f"odd.{name}", sample=8)
    # 3. structure-aware mutations (mostly still valid protobuf): compared with Python
    budget(0.45)
    for _ in range(int(2500 * scale)):
        raw = rng.choice(seeds)
        for _ in range(rng.randint(1, 3)):
            raw = structured_mutate(raw, rng)
        fz.one(raw, "structured")

    # 4. byte-level mutations, and random bytes
    budget(0.2)
    for _ in range(int(2500 * scale)):
        fz.one(byte_mutate(rng.choice(seeds), rng), "bytes")
    for _ in range(int(400 * scale)):
        n = rng.choice([0, 1, 2, 5, 16, 100, 1000])
        fz.one(rng.randbytes(rng.randint(0, n)), "random")
        # random fields with plausible tags
        fz.one(b"".join(nc.tag(rng.randint(1, 16), rng.choice([0, 1, 2, 5]))
                        + rng.randbytes(rng.randint(0, 9)) for _ in range(rng.randint(1, 30))),
               "random_tags")

    # 5. large inputs: linear time (the limits are generous: linear work is far below them)
    for name, raw, limit in huge_cases():
        t = time.perf_counter()
        fz.one(raw, f"huge.{name}", compare=False, slow_s=limit)
        fz.stats[f"huge.{name}.ms"] = int((time.perf_counter() - t) * 1000)
        want = {"10k-patients": 10_000, "10001-patients": 0}.get(name)
        if want is not None:
            got = _native.extract(raw, nc.NOW_US, b"fuzz", 7, KEY, KEY)
            if got is None or got[0] != want:
                fz.save(raw, f"huge.{name}: {got and got[0]} rows, not {want}")

    summary: dict[str, Any] = {k: fz.stats[k] for k in sorted(fz.stats)}
    summary["failures"] = fz.failures[:20]
    summary["failure_count"] = len(fz.failures)
    summary["python_errors"] = dict(fz.python_errors)
    summary["slow"] = fz.slow
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))
    return 1 if fz.failures or fz.slow else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(3)
