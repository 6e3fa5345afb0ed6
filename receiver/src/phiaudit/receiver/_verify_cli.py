"""``phiaudit verify`` and ``phiaudit prove``.

``phiaudit verify [--since T] [--until T] [--anchor DIR]`` recomputes every row's hash, checks
each writer's links and sequence numbers, the checkpoints' Merkle roots and signatures, and the
``checkpoints`` table against the anchor (default ``DATA_DIR.anchor/`` when it exists). It
prints ``OK`` with counts and exits 0, or every finding (kind, table, writer, sequence number,
event id; never a field's value) and exits 1.

``phiaudit prove EVENT_ID`` prints, as JSON, an inclusion proof of the event's row in the newest
anchored checkpoint of its writer's chain::

    {"format": "phiaudit-inclusion-proof/1",
     "event_id": "...", "table": "audit_events", "writer_id": "...", "seq": 42,
     "row_leaf": "<hex SHA-256 of the row's canonical encoding>",
     "prev_hash": "<hex>", "entry": "<hex chain hash of the row>",
     "leaf_index": 41, "tree_size": 1000, "root_hash": "<hex>",
     "inclusion_path": ["<hex>", ...],
     "checkpoint": "<the signed checkpoint note>",
     "key_id": "...", "public_key": "<base64 of the raw Ed25519 public key>"}

A third party checks it with nothing but SHA-256 and Ed25519:

1. the key: ``key_id`` is the first 16 hex digits of SHA-256(public key), and the public key is
   the one published for this trail (``DATA_DIR.anchor/keys/<key id>.pub``);
2. the signature: the note's body (everything before the empty line) verifies under the key
   with the base64 signature of its last line (``\\u2014 <key id> <signature>``); the body's
   ``origin``, ``writer``, ``size`` and ``root`` lines equal ``table``, ``writer_id``,
   ``tree_size`` and ``root_hash``;
3. the entry: ``entry = SHA-256(prev_hash || ns(writer_id) || ns(seq) || row_leaf)`` with
   ``ns(b) = ascii(len(b)) || ":" || b`` and ``seq`` in decimal (and, for whoever holds the row,
   ``row_leaf`` is SHA-256 of its canonical encoding, ``phiaudit.storage._chain``);
4. the inclusion: with ``leaf = SHA-256(0x00 || entry)``, the RFC 9162 section 2.1.3.2
   algorithm over ``leaf_index``, ``tree_size`` and ``inclusion_path`` gives ``root_hash``.

Embedded stores are opened directly, so the service must be stopped (one engine per data
directory); a ClickHouse server (``--clickhouse``) is verified while the service runs.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

__all__ = ["add_parsers", "cmd_prove", "cmd_verify"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    v = sub.add_parser("verify", parents=[common],
                       help="check the hash chains, checkpoints and anchor for tampering")
    v.add_argument("--since", help="only rows from this time on (ISO 8601, UTC by default)")
    v.add_argument("--until", help="only rows before this time (ISO 8601, UTC by default)")
    v.add_argument("--anchor", metavar="DIR",
                   help="checkpoint anchor directory (default DATA_DIR.anchor/)")
    v.add_argument("--mode", choices=["auto", "sql", "python"], default="auto",
                   help=argparse.SUPPRESS)
    p = sub.add_parser("prove", parents=[common],
                       help="print an inclusion proof of an event in the newest anchored "
                            "checkpoint",
                       description="phiaudit prove EVENT_ID" + __doc__.split(
                           "``phiaudit prove EVENT_ID``", 1)[1].split("Embedded stores", 1)[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("event_id")
    p.add_argument("--anchor", metavar="DIR",
                   help="checkpoint anchor directory (default DATA_DIR.anchor/)")
    for parser in (v, p):
        parser.add_argument("--token-file",
                            help="file holding the credential (default $PHIAUDIT_TOKEN)")


def _time(value: str | None, what: str) -> _dt.datetime | None:
    if not value:
        return None
    from phiaudit.storage import ConfigError

    try:
        t = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{what}: expected an ISO 8601 date or time") from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


def _open(args: argparse.Namespace, data_dir: str) -> tuple[Any, Path]:
    from phiaudit.storage import PhiAuditError, Store, StoreLocation, migrate

    url = args.clickhouse or os.environ.get("PHIAUDIT_CLICKHOUSE_URL") or None
    ddir = Path(data_dir).resolve()
    if url is None:
        run = ddir / "run" / "service.json"
        try:
            pid = int(json.loads(run.read_text())["pid"])
            os.kill(pid, 0)
            running = True
        except (OSError, ValueError, KeyError):
            running = False
        if running:
            raise PhiAuditError("the service holds this data directory: stop it first "
                                "(or verify a ClickHouse server with --clickhouse)")
        if not (ddir / "clickhouse").is_dir():
            raise PhiAuditError(f"no store in {ddir}")
    location = StoreLocation(data_dir=None if url else ddir, url=url)
    if url is None:
        migrate(location)  # an older store gets its checkpoints table
    return Store.open(location), ddir


def _authorize(args: argparse.Namespace, store: Any, ddir: Path, what: str) -> Any:
    """Reading the trail needs a reader credential, and the read is recorded in access_log,
    refused ones too. Returns ``record(rows)``, to be called before anything is shown (fail
    closed); the record comes after the check, so that verify's counts are those of the trail
    as it was asked about."""
    from phiaudit.storage import (
        ACCESS_LOG_COLUMNS,
        ROLES,
        AccessDenied,
        AccessRecord,
        BatchWriter,
        Credentials,
        KeyRing,
        Principal,
        RecordEncoder,
        TableSpec,
    )

    from ._service import writer_identity

    token = os.environ.get("PHIAUDIT_TOKEN", "")
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise AccessDenied(f"cannot read the token file ({exc.strerror})") from None
    who, outcome, reason = Principal("(unauthenticated)", ""), "ok", ""
    try:
        who = Credentials(ddir).authenticate(token)
        if who.role not in ROLES:
            raise AccessDenied("this role may not read the audit trail")
    except AccessDenied as exc:
        outcome, reason = "denied", str(exc)

    def record(rows: int) -> None:
        ring = KeyRing.open(ddir, create=False)
        encoder = RecordEncoder.for_ring(ring)
        writer = BatchWriter(store, writer_identity(ddir) + "/cli",
                             [TableSpec("access_log", ACCESS_LOG_COLUMNS, chained=True)])
        writer.start()
        try:
            entry = AccessRecord(who.name, who.role, "direct", f"phiaudit {what}", False, rows,
                                 outcome, reason)
            now = int(_dt.datetime.now(_dt.UTC).timestamp() * 1_000_000)
            writer.submit(None, {"access_log": [encoder.access_row(entry, now)]}).result(60)
        finally:
            writer.shutdown()

    if outcome != "ok":
        record(0)
        raise AccessDenied(reason)
    return record


def _anchor(args: argparse.Namespace, ddir: Path) -> Any:
    from phiaudit.storage import DirectoryAnchor, default_anchor_dir

    path = Path(args.anchor) if args.anchor else default_anchor_dir(ddir)
    if not path.is_dir():
        if args.anchor:
            from phiaudit.storage import ConfigError

            raise ConfigError(f"--anchor: no such directory {path}")
        return None
    return DirectoryAnchor(path)


class _Progress:
    """A progress bar on stderr, only when it is a terminal."""

    def __init__(self) -> None:
        self.on = sys.stderr.isatty()

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.on:
            return
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {frac:4.0%} {what:<30}")
        sys.stderr.flush()

    def end(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()


def cmd_verify(args: argparse.Namespace, data_dir: str) -> int:
    from phiaudit.storage import public_keys, verify

    since, until = _time(args.since, "--since"), _time(args.until, "--until")
    store, ddir = _open(args, data_dir)
    try:
        record = _authorize(args, store, ddir, "verify")
        anchor = _anchor(args, ddir)
        progress = _Progress()
        try:
            report = verify(store, keys=public_keys(ddir), anchor=anchor, since=since,
                            until=until, mode=args.mode, progress=progress)
        finally:
            progress.end()
        record(report.rows)
    finally:
        store.close()
    counts = (f"{report.rows} rows of {report.writers} writer(s), {report.checkpoints} stored "
              f"and {report.anchored} anchored checkpoint(s); hashes recomputed in "
              f"{report.mode.upper() if report.mode == 'sql' else 'Python'}")
    if anchor is None:
        print("phiaudit verify: no anchor directory: stored checkpoints are not compared with "
              "an anchor", file=sys.stderr)
    if report.ok:
        print(f"OK: {counts}")
        return 0
    for finding in report.findings:
        print(str(finding))
    print(f"FAILED: {len(report.findings)} finding(s); {counts}")
    return 1


def cmd_prove(args: argparse.Namespace, data_dir: str) -> int:
    from phiaudit.storage import (
        CHAINED_TABLES,
        PhiAuditError,
        inclusion_proof,
        leaf_hash,
        leaf_sql,
        origin_for,
        public_keys,
        verify_inclusion,
    )

    try:
        event_id = str(uuid.UUID(args.event_id))
    except ValueError:
        from phiaudit.storage import ConfigError

        raise ConfigError("EVENT_ID: expected a UUID") from None
    store, ddir = _open(args, data_dir)
    try:
        _authorize(args, store, ddir, "prove")(1)
        anchor = _anchor(args, ddir)
        if anchor is None:
            raise PhiAuditError("no anchor directory: nothing to prove against")
        found = None
        for table, (columns, _) in CHAINED_TABLES.items():
            _, rows = store.query(
                f"SELECT writer_id, seq, prev_hash, hash, {leaf_sql(columns)} FROM {table} "
                f"WHERE `{columns[0].name}` = {{e:UUID}} ORDER BY seq LIMIT 2",  # its row id
                {"e": event_id}, binary=True)
            if rows:
                if len(rows) > 1:
                    raise PhiAuditError("the event id appears twice: run phiaudit verify")
                found = (table, rows[0])
                break
        if found is None:
            raise PhiAuditError(f"no event {event_id}")
        table, (writer, seq, prev, entry, row_leaf) = found
        writer = writer.decode() if isinstance(writer, bytes) else str(writer)
        seq = int(seq)
        origin = origin_for(store.database, table)
        cps = [c for c in anchor.checkpoints()
               if c.origin == origin and c.writer_id == writer and c.tree_size >= seq]
        if not cps:
            raise PhiAuditError("no anchored checkpoint covers this event yet")
        cp = max(cps, key=lambda c: (c.time_us, c.tree_size))
        _, leaves_rows = store.query(
            f"SELECT SHA256(concat(unhex('00'), hash)) FROM {table} "
            "WHERE writer_id = {w:String} AND seq <= {n:UInt64} ORDER BY seq",
            {"w": writer, "n": cp.tree_size}, binary=True)
    finally:
        store.close()
    leaves = [bytes(r[0]) for r in leaves_rows]
    if len(leaves) != cp.tree_size:
        raise PhiAuditError("the stored rows do not match the anchored checkpoint: "
                            "run phiaudit verify")
    path = inclusion_proof(seq - 1, leaves)
    if not verify_inclusion(leaf_hash(bytes(entry)), seq - 1, cp.tree_size, path, cp.root_hash):
        raise PhiAuditError("the stored rows do not match the anchored checkpoint: "
                            "run phiaudit verify")
    keys = {**public_keys(ddir), **anchor.public_keys()}
    public = keys.get(cp.key_id)
    if public is None or cp.verify(keys) is not True:
        raise PhiAuditError("the anchored checkpoint's signature does not verify")
    proof = {
        "format": "phiaudit-inclusion-proof/1",
        "event_id": event_id, "table": table, "writer_id": writer, "seq": seq,
        "row_leaf": bytes(row_leaf).hex(), "prev_hash": bytes(prev).hex(),
        "entry": bytes(entry).hex(),
        "leaf_index": seq - 1, "tree_size": cp.tree_size, "root_hash": cp.root_hash.hex(),
        "inclusion_path": [p.hex() for p in path],
        "checkpoint": cp.note(), "key_id": cp.key_id,
        "public_key": base64.b64encode(public).decode(),
    }
    print(json.dumps(proof, indent=1))
    return 0
