"""``verify``: recompute the chains and check the signed checkpoints against them.

What is checked, for each chained table (``audit_events``, ``access_log``) and each writer:

1. every row's hash: ``hash = SHA-256(prev_hash || ns(writer_id) || ns(seq) || leaf)`` with
   ``leaf = SHA-256(canonical row)`` (``_chain.py``) - a changed field, sequence number or
   writer shows here;
2. the links and the numbering: row ``n``'s ``prev_hash`` is row ``n-1``'s ``hash`` (32 zero
   bytes for row 1), and the sequence numbers run 1, 2, 3, ... without gap or repetition -
   a deleted, inserted or reordered row shows here;
3. the checkpoints: each stored or anchored checkpoint's Ed25519 signature, and its root
   against the RFC 6962 tree hash of the rows' chain hashes 1..size - a truncated tail, or a
   chain rewritten consistently (by someone without the signing key) shows here;
4. the ``checkpoints`` table against the anchor: every anchored checkpoint must be stored,
   every stored one anchored, with the same content - a deleted checkpoint, or a rewrite
   re-signed with a stolen key, shows here.

Steps 1 and 2 run inside ClickHouse: the canonical encoding is built from ``SHA256``,
``concat`` and ``length`` (byte-identical to Python's), the links with the window function
``lagInFrame`` over ``(writer_id, seq)``, and only the rows that fail come back. When the
engine cannot run that query, the same checks run in Python over the fetched rows. For step 3
the engine computes the RFC 6962 leaf hashes and Python folds them into roots.

Findings name the table, writer, sequence number and event id, never a field's value.
``since``/``until`` limit steps 1 and 2 to each writer's rows in that time range (linked to
the row before it); steps 3 and 4 always cover every checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._chain import GENESIS, canonical_encoder
from ._checkpoint import Anchor, Checkpoint, load_checkpoints, origin_for
from ._errors import PermanentError
from ._merkle import CompactRange
from ._schema import ACCESS_LOG_COLUMNS, ALERT_COLUMNS, AUDIT_COLUMNS, INFRA_COLUMNS, Column

__all__ = ["CHAINED_TABLES", "Finding", "VerifyReport", "leaf_sql", "verify"]

_log = logging.getLogger("phiaudit.storage.verify")

#: The hash-chained tables and the time column that ``since``/``until`` select on.
CHAINED_TABLES: dict[str, tuple[list[Column], str]] = {
    "audit_events": (AUDIT_COLUMNS, "event_time"),
    "access_log": (ACCESS_LOG_COLUMNS, "time"),
    "infra_events": (INFRA_COLUMNS, "event_time"),
    "alerts": (ALERT_COLUMNS, "time"),
}
_POSITION = ("writer_id", "seq", "prev_hash", "hash")


@dataclass(frozen=True)
class Finding:
    kind: str
    table: str
    writer_id: str
    seq: int | None
    event_id: str
    detail: str

    def __str__(self) -> str:
        seq = "-" if self.seq is None else str(self.seq)
        eid = self.event_id or "-"
        return (f"{self.kind}: table={self.table} writer={self.writer_id} seq={seq} "
                f"event={eid}: {self.detail}")


@dataclass
class VerifyReport:
    rows: int = 0
    writers: int = 0
    checkpoints: int = 0
    anchored: int = 0
    mode: str = "sql"
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def _ns_sql(x: str) -> str:
    return f"concat(toString(length({x})), ':', {x})"


def _field_sql(c: Column) -> str:
    n = f"`{c.name}`"
    t = c.type
    if t == "UUID":
        return _ns_sql(f"toString({n})")
    if t.startswith("DateTime64(6"):
        return _ns_sql(f"toString(toUnixTimestamp64Micro({n}))")
    if t == "Bool":
        return _ns_sql(f"if({n}, '1', '0')")
    if t.startswith(("UInt", "Int")):
        return _ns_sql(f"toString({n})")
    if t.startswith("Array("):
        items = f"arrayMap(v -> toString(v), {n})" if t == "Array(UUID)" else n
        return _ns_sql(
            f"arrayStringConcat(arrayMap(v -> concat(toString(length(v)), ':', v), {items}))")
    return _ns_sql(f"toString({n})")


def leaf_sql(columns: Sequence[Column]) -> str:
    """ClickHouse expression of a row's leaf, ``SHA256(canonical row)``, byte-identical to
    ``_chain.canonical_encoder``."""
    parts = [_field_sql(c) for c in columns if c.name not in _POSITION]
    return "SHA256(concat(" + ", ".join(parts) + "))"


def _hash_sql(columns: Sequence[Column]) -> str:
    return (f"SHA256(concat(prev_hash, {_ns_sql('toString(writer_id)')}, "
            f"{_ns_sql('toString(seq)')}, {leaf_sql(columns)}))")


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)


def _ranges(store: Any, table: str, time_col: str, since: _dt.datetime | None,
            until: _dt.datetime | None) -> list[tuple[str, int, int, int]]:
    """(writer, first seq, last seq, rows) per writer, within the time range."""
    cond, params = [], {}
    if since is not None:
        cond.append(f"{time_col} >= {{since:DateTime64(6, 'UTC')}}")
        params["since"] = since
    if until is not None:
        cond.append(f"{time_col} < {{until:DateTime64(6, 'UTC')}}")
        params["until"] = until
    where = ("WHERE " + " AND ".join(cond)) if cond else ""
    _, rows = store.query(f"SELECT writer_id, min(seq), max(seq), count() FROM {table} {where} "
                          "GROUP BY writer_id ORDER BY writer_id", params, binary=True)
    return [(_text(w), int(a), int(b), int(n)) for w, a, b, n in rows]


def _bad_rows_sql(store: Any, table: str, columns: Sequence[Column],
                  ranges: list[tuple[str, int, int, int]], windowed: bool,
                  ) -> list[tuple[str, int, str, bool, bool, int, str]]:
    params: dict[str, Any] = {}
    where = ""
    if windowed:
        conds = []
        for i, (w, lo, hi, _) in enumerate(ranges):
            params[f"w{i}"], params[f"lo{i}"], params[f"hi{i}"] = w, max(lo - 1, 1), hi
            conds.append(f"(writer_id = {{w{i}:String}} AND seq BETWEEN {{lo{i}:UInt64}} "
                         f"AND {{hi{i}:UInt64}})")
        where = "WHERE " + " OR ".join(conds)
    first_checked = "seq = 1" if windowed else "1"
    idc = f"`{columns[0].name}`"
    sql = f"""
SELECT writer_id, seq, eid, content_ok, link_ok, pseq, peid FROM (
  SELECT writer_id, seq, toString({idc}) AS eid,
         hash = {_hash_sql(columns)} AS content_ok,
         prev_hash = lagInFrame(hash) OVER w AS link_ok,
         lagInFrame(seq) OVER w AS pseq,
         lagInFrame(toString({idc})) OVER w AS peid,
         row_number() OVER w AS rn
  FROM {table} {where}
  WINDOW w AS (PARTITION BY writer_id ORDER BY seq, {idc}
               ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
) WHERE NOT content_ok OR ((rn > 1 OR {first_checked})
                          AND (NOT link_ok OR seq != pseq + 1))
ORDER BY writer_id, seq"""
    _, rows = store.query(sql, params, binary=True)
    return [(_text(w), int(s), _text(e), bool(c), bool(lk), int(p), _text(pe))
            for w, s, e, c, lk, p, pe in rows]


def _bad_rows_python(store: Any, table: str, columns: Sequence[Column],
                     ranges: list[tuple[str, int, int, int]], windowed: bool,
                     ) -> list[tuple[str, int, str, bool, bool, int, str]]:
    enc = canonical_encoder(columns)
    names = [c.name for c in columns]
    _, i_s, i_p, i_h, i_e = (names.index(n) for n in (*_POSITION, names[0]))
    sha = hashlib.sha256
    out = []
    for w, lo, hi, _ in ranges:
        start = max(lo - 1, 1) if windowed else 1
        select = ", ".join(f"`{n}`" for n in names)
        _, rows = store.query(
            f"SELECT {select} FROM {table} WHERE writer_id = {{w:String}} AND seq >= {{a:UInt64}} "
            f"AND seq <= {{b:UInt64}} ORDER BY seq, `{names[0]}`", {"w": w, "a": start, "b": hi},
            binary=True)
        prev_hash, prev_seq, prev_eid = GENESIS, 0, ""
        wb = str(len(w.encode())).encode() + b":" + w.encode()
        for rn, row in enumerate(rows, 1):
            seq = int(row[i_s])
            s = b"%d" % seq
            expect = sha(bytes(row[i_p]) + wb + b"%d:%b" % (len(s), s)
                         + sha(enc(row)).digest()).digest()
            content_ok = expect == bytes(row[i_h])
            link_ok = bytes(row[i_p]) == prev_hash
            first_checked = seq == 1 if windowed else True
            if not content_ok or ((rn > 1 or first_checked)
                                  and (not link_ok or seq != prev_seq + 1)):
                out.append((w, seq, str(row[i_e]), content_ok, link_ok, prev_seq, prev_eid))
            prev_hash, prev_seq, prev_eid = bytes(row[i_h]), seq, str(row[i_e])
    return out


def _row_findings(table: str, bad: list[tuple[str, int, str, bool, bool, int, str]],
                  ) -> list[Finding]:
    out = []
    for w, seq, eid, content_ok, link_ok, pseq, peid in bad:
        if not content_ok:
            out.append(Finding("row_altered", table, w, seq, eid,
                               "the stored hash does not match the row's content, writer or "
                               "sequence number"))
        if seq == pseq:
            out.append(Finding("duplicate_seq", table, w, seq, eid,
                               f"a second row with this sequence number (the other is event "
                               f"{peid}; the checkpoints tell which one was signed)"))
        elif seq != pseq + 1:
            what = (f"rows {pseq + 1}..{seq - 1} are missing" if seq > pseq + 1
                    else "sequence numbers out of order")
            out.append(Finding("gap", table, w, seq, eid, what))
        elif not link_ok:
            out.append(Finding("broken_link", table, w, seq, eid,
                               f"prev_hash is not the hash of row {seq - 1}"))
    return out


def _check_checkpoints(
    store: Any, database: str, stored: list[Checkpoint], anchored: list[Checkpoint] | None,
    keys: dict[str, bytes], report: VerifyReport,
) -> None:
    f = report.findings

    def key(cp: Checkpoint) -> tuple[str, str, int, int]:
        return (cp.origin, cp.writer_id, cp.tree_size, cp.time_us)

    by_key_stored = {key(c): c for c in stored}
    union: dict[tuple[str, str, int, int], Checkpoint] = dict(by_key_stored)
    if anchored is not None:
        by_key_anchor = {key(c): c for c in anchored}
        for k, cp in by_key_anchor.items():
            st = by_key_stored.get(k)
            if st is None:
                f.append(Finding("checkpoint_missing", cp.table, cp.writer_id, cp.tree_size, "",
                                 f"the anchored checkpoint of {cp.time.isoformat()} is not in "
                                 "the checkpoints table (deleted?)"))
            elif st != cp:
                f.append(Finding("checkpoint_conflict", cp.table, cp.writer_id, cp.tree_size, "",
                                 f"the stored checkpoint of {cp.time.isoformat()} differs from "
                                 "the anchored one"))
            union[k] = cp  # the anchored one is authoritative
        for k, cp in by_key_stored.items():
            if k not in by_key_anchor:
                f.append(Finding("checkpoint_not_anchored", cp.table, cp.writer_id, cp.tree_size,
                                 "", f"the stored checkpoint of {cp.time.isoformat()} is not "
                                 "in the anchor"))
                # both versions are checked against the rows below
                union[(*k[:3], -k[3] - 1)] = cp
    checked: list[Checkpoint] = []
    for cp in union.values():
        ok = cp.verify(keys)
        if ok is None:
            f.append(Finding("unknown_signing_key", cp.table, cp.writer_id, cp.tree_size, "",
                             f"checkpoint of {cp.time.isoformat()} signed by unknown key "
                             f"{cp.key_id}"))
        elif not ok:
            f.append(Finding("bad_signature", cp.table, cp.writer_id, cp.tree_size, "",
                             f"checkpoint of {cp.time.isoformat()}: the signature is wrong"))
        checked.append(cp)
    # roots against the rows, per chain
    chains: dict[tuple[str, str], list[Checkpoint]] = {}
    for cp in checked:
        chains.setdefault((cp.origin, cp.writer_id), []).append(cp)
    tables = {origin_for(database, t): t for t in CHAINED_TABLES}
    for (origin, writer), cps in sorted(chains.items()):
        table = tables.get(origin)
        if table is None:
            f.append(Finding("unknown_origin", origin.rsplit("/", 1)[-1], writer, None, "",
                             "a checkpoint of a chain this database does not hold"))
            continue
        cps.sort(key=lambda c: (c.tree_size, c.time_us))
        max_seq, roots = _chain_roots(store, table, writer, sorted({c.tree_size for c in cps}))
        last_good = 0
        for cp in cps:
            if max_seq < cp.tree_size:
                f.append(Finding("checkpoint_beyond_rows", table, writer, max_seq + 1, "",
                                 f"the checkpoint of {cp.time.isoformat()} covers "
                                 f"{cp.tree_size} rows, the last stored is {max_seq} (rows "
                                 f"{max_seq + 1}..{cp.tree_size} missing: tail truncated?)"))
                continue
            if roots.get(cp.tree_size) != cp.root_hash:
                f.append(Finding("root_mismatch", table, writer, cp.tree_size, "",
                                 f"rows 1..{cp.tree_size} do not hash to the root of the "
                                 f"checkpoint of {cp.time.isoformat()}: rows changed between "
                                 f"seq {last_good + 1} and {cp.tree_size}"))
            else:
                last_good = max(last_good, cp.tree_size)


#: the tree's lowest levels are folded in SQL, in perfect subtrees of 2**_LEVELS leaves
_LEVELS = 8
BLOCK_LEAVES = 1 << _LEVELS


def block_roots(store: Any, table: str, writer: str, start: int, end: int,
                ) -> list[bytes | None]:
    """RFC 6962 roots of the writer's perfect subtrees of 2**_LEVELS chain hashes covering
    rows ``start+1 .. end`` (``start`` and ``end`` multiples of 2**_LEVELS), folded in
    ClickHouse (``GROUP BY intDiv(index, 2)`` per level, children ordered by index). A block
    that does not hold exactly its rows (a row missing or repeated) gets None."""
    block = 1 << _LEVELS
    if end <= start:
        return []
    q = (f"SELECT seq - 1 AS i0, SHA256(concat(unhex('00'), hash)) AS h0, toUInt64(1) AS c0 "
         f"FROM {table} WHERE writer_id = {{w:String}} AND seq > {{a:UInt64}} "
         f"AND seq <= {{b:UInt64}}")
    for k in range(1, _LEVELS + 1):
        j = k - 1
        q = (f"SELECT intDiv(i{j}, 2) AS i{k}, SHA256(concat(unhex('01'), argMin(h{j}, i{j}), "
             f"argMax(h{j}, i{j}))) AS h{k}, sum(c{j}) AS c{k} FROM ({q}) "
             f"GROUP BY intDiv(i{j}, 2)")
    top = _LEVELS
    _, rows = store.query(f"SELECT i{top}, h{top}, c{top} FROM ({q}) ORDER BY i{top}",
                          {"w": writer, "a": start, "b": end}, binary=True)
    got = {int(i): (bytes(h), int(c)) for i, h, c in rows}
    return [got[k][0] if got.get(k, (b"", 0))[1] == block else None
            for k in range(start // block, end // block)]


#: the bytes of one row in ``chain_rows``: seq (UInt64, little-endian), prev_hash, hash
CHAIN_ROW_BYTES = 8 + 32 + 32


def chain_rows(store: Any, table: str, writer: str, start: int, end: int) -> bytes:
    """The writer's rows ``start+1 .. end`` as stored, in seq order, as one blob of
    ``CHAIN_ROW_BYTES`` per row (seq little-endian, prev_hash, hash: their RowBinary), for a
    compiled fold to check and fold at about a third of ``block_roots``' cost (the
    receiver's ``chain_fold``). Rows missing or repeated show in its length."""
    data: bytes = store.query_raw(
        f"SELECT seq, prev_hash, hash FROM {table} WHERE writer_id = {{w:String}} "
        "AND seq > {a:UInt64} AND seq <= {b:UInt64} ORDER BY seq",
        {"w": writer, "a": start, "b": end}, fmt="RowBinary")
    return data


def _chain_roots(store: Any, table: str, writer: str, sizes: list[int],
                 ) -> tuple[int, dict[int, bytes]]:
    """(last stored seq, {size: RFC 6962 root of the chain hashes of rows 1..size}).

    ClickHouse computes the leaf hashes and folds them into perfect subtrees of 256 leaves
    (``GROUP BY intDiv(index, 2)`` per level, children ordered by index); Python folds those
    and the leaves of the last, partial block of each size. A block that does not hold exactly
    its 256 rows (a row missing or repeated) gets no hash, so no root over it matches.
    """
    w = {"w": writer}
    idc = CHAINED_TABLES[table][0][0].name
    _, top = store.query(f"SELECT max(seq) FROM {table} WHERE writer_id = {{w:String}}", w)
    max_seq = int(top[0][0] or 0)
    sizes = [n for n in sizes if 0 < n <= max_seq]
    if not sizes:
        return max_seq, {}
    block = 1 << _LEVELS
    full = sizes[-1] // block * block
    blocks = block_roots(store, table, writer, 0, full)
    partial = sorted({n // block for n in sizes if n % block})
    leaves: dict[int, list[bytes]] = {}
    if partial:
        _, rows = store.query(
            f"SELECT intDiv(seq - 1, {block}), SHA256(concat(unhex('00'), hash)) FROM {table} "
            "WHERE writer_id = {w:String} AND seq >= 1 AND has({b:Array(UInt64)}, "
            f"intDiv(seq - 1, {block})) ORDER BY seq, `{idc}`", {**w, "b": partial},
            binary=True)
        for k, h in rows:
            leaves.setdefault(int(k), []).append(bytes(h))
    roots: dict[int, bytes] = {}
    tree = CompactRange()
    fed = 0
    broken = False
    for n in sizes:
        while fed < n // block and not broken:
            node = blocks[fed]
            if node is None:
                broken = True
                break
            tree.append_subtree(_LEVELS, node)
            fed += 1
        if broken:
            continue
        rest = n % block
        got_leaves = leaves.get(n // block, [])
        if rest:
            if len(got_leaves) < rest:
                continue
            t = tree.copy()
            t.extend(got_leaves[:rest])
            roots[n] = t.root()
        else:
            roots[n] = tree.root()
    return max_seq, roots


def verify(
    store: Any,
    *,
    keys: dict[str, bytes],
    anchor: Anchor | None = None,
    since: _dt.datetime | None = None,
    until: _dt.datetime | None = None,
    mode: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    writers: Sequence[str] | None = None,
) -> VerifyReport:
    """Check the store's chains and checkpoints; the report lists every finding.

    ``keys`` maps checkpoint key ids to raw Ed25519 public keys (``public_keys(data_dir)``,
    plus the anchor's). ``mode`` is ``sql``, ``python`` or ``auto`` (SQL, else Python).
    ``writers`` limits every check to those writers' chains.
    """
    if mode not in ("auto", "sql", "python"):
        raise ValueError("mode: auto, sql or python")
    report = VerifyReport(mode="python" if mode == "python" else "sql")
    windowed = since is not None or until is not None
    plan = []
    total = 0
    seen: set[str] = set()
    only = set(writers) if writers is not None else None
    for table, (columns, time_col) in CHAINED_TABLES.items():
        ranges = _ranges(store, table, time_col, since, until)
        if only is not None:
            ranges = [r for r in ranges if r[0] in only]
        plan.append((table, columns, ranges))
        total += sum(r[3] for r in ranges)
        seen.update(r[0] for r in ranges)
    report.writers = len(seen)
    done = 0
    for table, columns, ranges in plan:
        if not ranges:
            continue
        bad = None
        if report.mode == "sql":
            try:
                bad = _bad_rows_sql(store, table, columns, ranges, windowed)
            except PermanentError:
                if mode == "sql":
                    raise
                _log.warning("verify: the engine cannot recompute hashes in SQL; using Python")
                report.mode = "python"
        if bad is None:
            bad = _bad_rows_python(store, table, columns, ranges, windowed)
        report.findings += _row_findings(table, bad)
        done += sum(r[3] for r in ranges)
        report.rows = done
        if progress is not None:
            progress(f"rows of {table}", done, total)
    stored = load_checkpoints(store)
    anchored = anchor.checkpoints() if anchor is not None else None
    if only is not None:
        stored = [c for c in stored if c.writer_id in only]
        anchored = None if anchored is None else [c for c in anchored if c.writer_id in only]
    all_keys = dict(keys)
    if anchor is not None:
        all_keys.update(anchor.public_keys())
    report.checkpoints = len(stored)
    report.anchored = len(anchored or [])
    _check_checkpoints(store, store.database, stored, anchored, all_keys, report)
    if progress is not None:
        progress("checkpoints", total, total)
    return report
