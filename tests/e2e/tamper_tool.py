"""Tamper with a stopped service's store, as a database administrator could: a child process
opening the data directory with the unrestricted (admin) engine, the way schema migrations do.

``python -m tests.e2e.tamper_tool DATA_DIR SCENARIO [ARG]``; prints a JSON line describing
what it changed (sequence numbers, event ids). The service's own connection cannot do any of
this (tests/receiver/test_append_only.py); this is the attacker that ``verify`` must catch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from phiaudit.storage import (
    AUDIT_COLUMNS,
    CHECKPOINT_COLUMNS,
    Checkpoint,
    CompactRange,
    SigningKey,
    admin_client,
    canonical_encoder,
    leaf_hash,
)
from phiaudit.storage._chain import ChainState, link_rows

DB = "phiaudit"
NAMES = [c.name for c in AUDIT_COLUMNS]
FMT = {"String": "bytes", "FixedString": "bytes"}
NOSYNC = {"mutations_sync": 2}
NODEDUP = {"insert_deduplicate": 0}


def _rows(client: Any, writer: str) -> list[list[Any]]:
    res = client.query(f"SELECT {', '.join(f'`{n}`' for n in NAMES)} FROM {DB}.audit_events "
                       "WHERE writer_id = {w:String} ORDER BY seq", parameters={"w": writer},
                       query_formats=FMT)
    return [list(r) for r in res.result_rows]


def _fix(row: list[Any]) -> list[Any]:
    """Values as the insert wants them (LowCardinality and arrays as text)."""
    out = []
    for c, v in zip(AUDIT_COLUMNS, row, strict=True):
        if c.type.startswith(("LowCardinality", "Array")) and c.name != "writer_id":
            if isinstance(v, list):
                v = [x.decode() if isinstance(x, bytes) else x for x in v]
            elif isinstance(v, bytes):
                v = v.decode()
        if c.name == "writer_id" and isinstance(v, bytes):
            v = v.decode()
        out.append(v)
    return out


def _insert(client: Any, rows: list[list[Any]]) -> None:
    client.insert(f"{DB}.audit_events", [_fix(r) for r in rows], column_names=NAMES,
                  settings=NODEDUP)


def _relink(rows: list[list[Any]], start: int) -> None:
    """Recompute prev_hash/hash of rows[start:] consistently (no key needed)."""
    i_p, i_h = NAMES.index("prev_hash"), NAMES.index("hash")
    prev = rows[start - 1][i_h] if start else b"\x00" * 32
    writer = rows[0][NAMES.index("writer_id")]
    writer = writer.decode() if isinstance(writer, bytes) else writer
    tail = [_fix(r) for r in rows[start:]]
    link_rows(ChainState(writer, start, prev), AUDIT_COLUMNS, tail,
              canonical_encoder(AUDIT_COLUMNS))
    for j, r in enumerate(tail):
        rows[start + j][i_p], rows[start + j][i_h] = r[i_p], r[i_h]


def main(data_dir: Path, scenario: str, arg: int) -> dict[str, Any]:
    client = admin_client(data_dir)
    writer = (data_dir / "writer_id").read_text().strip()
    rows = _rows(client, writer)
    eid = {int(r[NAMES.index("seq")]): str(r[0]) for r in rows}
    out: dict[str, Any] = {"writer": writer, "rows": len(rows)}
    w = {"w": writer}
    if scenario == "update_field":
        client.command(f"ALTER TABLE {DB}.audit_events UPDATE action = 'delete' "
                       "WHERE writer_id = {w:String} AND seq = {s:UInt64}",
                       parameters={**w, "s": arg}, settings=NOSYNC)
        out["event_id"] = eid[arg]
    elif scenario == "delete_rows_from":  # arg: first seq deleted; arg2 via "upto"
        client.command(f"ALTER TABLE {DB}.audit_events DELETE WHERE writer_id = {{w:String}} "
                       "AND seq >= {s:UInt64}", parameters={**w, "s": arg}, settings=NOSYNC)
    elif scenario == "delete_row":
        client.command(f"ALTER TABLE {DB}.audit_events DELETE WHERE writer_id = {{w:String}} "
                       "AND seq = {s:UInt64}", parameters={**w, "s": arg}, settings=NOSYNC)
        out["event_id"] = eid[arg]
    elif scenario == "forge_row":
        import uuid

        forged = list(rows[arg - 1])
        forged[0] = uuid.uuid4()
        forged[NAMES.index("action")] = b"read"
        # a well-formed row claiming sequence number `arg`, linked to row arg-1
        fake = [forged]
        _relink(rows[: arg - 1] + fake, arg - 1)
        _insert(client, fake)
        out["event_id"] = str(forged[0])
    elif scenario == "reorder":  # swap the contents of rows arg and arg+1
        i_s = NAMES.index("seq")
        a, b = list(rows[arg - 1]), list(rows[arg])
        a[i_s], b[i_s] = b[i_s], a[i_s]
        client.command(f"ALTER TABLE {DB}.audit_events DELETE WHERE writer_id = {{w:String}} "
                       "AND seq IN ({s:UInt64}, {t:UInt64})",
                       parameters={**w, "s": arg, "t": arg + 1}, settings=NOSYNC)
        _insert(client, [b, a])
        out["event_ids"] = [eid[arg], eid[arg + 1]]
    elif scenario in ("rewrite", "rewrite_stolen_key"):
        rows[arg - 1][NAMES.index("action")] = b"delete"
        _relink(rows, arg - 1)
        client.command(f"ALTER TABLE {DB}.audit_events DELETE WHERE writer_id = {{w:String}}",
                       parameters=w, settings=NOSYNC)
        _insert(client, rows)
        if scenario == "rewrite_stolen_key":
            key = SigningKey.open(data_dir)  # the stolen key
            res = client.query(
                f"SELECT origin, tree_size, toUnixTimestamp64Micro(time) FROM {DB}.checkpoints "
                "WHERE writer_id = {w:String} AND origin LIKE '%/audit_events' ORDER BY tree_size",
                parameters=w)
            i_h = NAMES.index("hash")
            new = []
            for origin, size, t in res.result_rows:
                tree = CompactRange()
                for r in rows[:size]:
                    tree.append(leaf_hash(bytes(r[i_h])))
                cp = key.sign(Checkpoint(origin, writer, int(size), tree.root(), int(t)))
                new.append([cp.origin, cp.writer_id, cp.tree_size, cp.root_hash, cp.time,
                            cp.key_id, cp.signature])
            client.command(f"ALTER TABLE {DB}.checkpoints DELETE WHERE writer_id = {{w:String}} "
                           "AND origin LIKE '%/audit_events'", parameters=w, settings=NOSYNC)
            client.insert(f"{DB}.checkpoints", new,
                          column_names=[c.name for c in CHECKPOINT_COLUMNS], settings=NODEDUP)
            out["checkpoints"] = len(new)
    elif scenario == "delete_checkpoint":  # the arg-th smallest checkpoint
        res = client.query(f"SELECT tree_size FROM {DB}.checkpoints WHERE writer_id = "
                           "{w:String} AND origin LIKE '%/audit_events' ORDER BY tree_size",
                           parameters=w)
        size = int(res.result_rows[arg][0])
        client.command(f"ALTER TABLE {DB}.checkpoints DELETE WHERE writer_id = {{w:String}} "
                       "AND tree_size = {s:UInt64}", parameters={**w, "s": size},
                       settings=NOSYNC)
        out["tree_size"] = size
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    client.close()
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]).resolve(), sys.argv[2],
                  int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(json.dumps(result))
