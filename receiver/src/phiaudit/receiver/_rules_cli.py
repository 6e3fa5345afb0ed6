"""``phiaudit rules``, ``phiaudit alerts`` and ``phiaudit care``.

* ``phiaudit rules list`` — every rule (built-in and from rule files) with its severity, title,
  whether it runs, and its parameters after the configuration's settings.
* ``phiaudit rules explain RULE`` — the SQL the rule runs (over its latest due window).
* ``phiaudit rules run [--backfill FROM TO]`` — one scheduled run now (the windows due since
  the last run), or the rules over a past period (alerts that overlap stored ones are not
  raised again); the new alerts are delivered to the sinks.
* ``phiaudit rules test FILE [--rules FILE ...]`` — try rules on events of your own, in a
  temporary store that is deleted afterwards: nothing of the audit trail is read or written,
  and no credential is needed. FILE holds one JSON object per line (see below).
* ``phiaudit alerts list [--since T] [--rule RULE] [--format table|json]`` — the alerts raised,
  newest first, with the sinks they were delivered to.
* ``phiaudit care load FILE [--format csv|fhir]`` — add care relationships (the ``security``
  role only). CSV: ``actor_id,patient_id,start,end[,relationship]``; fhir: FHIR R4 NDJSON of
  Encounter, CareTeam and EpisodeOfCare (see ``phiaudit.rules._care``).

Everything but ``rules test`` needs a credential (``$PHIAUDIT_TOKEN`` or ``--token-file``;
the security or compliance role) and is recorded in ``access_log``, refused calls too. With a
service running on the data directory the commands go through it (its configuration's rules
and sinks); otherwise they open the store directly, with the rules of ``--config FILE``.

The ``rules test`` line format (``type`` defaults to ``audit``; times are ISO 8601, UTC when no
zone is given, or integer microseconds since the epoch)::

    {"type": "audit", "time": "2026-03-02T03:10:00Z", "action": "login", "outcome": "failure",
     "actor_id": "dr-a", "client_address": "10.1.2.3"}
    {"time": "2026-03-02T03:12:00Z", "action": "read", "outcome": "success", "actor_id": "dr-a",
     "actor_roles": ["physician"], "patient_id": "p-1", "resource_type": "Patient"}
    {"type": "infra", "time": "...", "source_kind": "pgaudit", "actor_id": "app", "operation":
     "SELECT", "object_type": "table", "object": "public.patients", "phi_touch": true,
     "phi_object": "public.patients", "outcome": "success", "trace_id": "<32 hex>"}
    {"type": "access", "time": "...", "principal": "eve", "role": "compliance", "interface":
     "direct", "statement": "SELECT 1", "outcome": "denied", "reason": "..."}
    {"type": "care", "actor_id": "dr-a", "patient_id": "p-1", "start": "2026-03-01", "end": ""}

An ``audit`` line takes the fields of an audit event (``action``, ``outcome``, ``actor_id``,
``actor_type``, ``actor_roles``, ``service_name``, ``resource_type``, ``resource_id``,
``patient_id``, ``record_count``, ``purpose``, ``client_address``, ``trace_id``, ...), an
``infra`` line those of an infrastructure record, an ``access`` line those of an access_log
entry; ``event_id`` is optional. The rules are evaluated (as a backfill) over every window
from the first event to one day after the last (``--from``/``--to`` to choose), and each alert
is printed with the line numbers of its evidence.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from phiaudit.storage import ConfigError, PermanentError

from ._client import call_service

__all__ = ["add_parsers", "run_command"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    auth = argparse.ArgumentParser(add_help=False)
    auth.add_argument("--token-file", help="file holding the credential (default "
                      "$PHIAUDIT_TOKEN)")
    auth.add_argument("--config", help="service YAML configuration whose rules: section to use "
                      "when no service runs (a running service uses its own)")

    r = sub.add_parser("rules", help="list, explain, test and run the alert rules",
                       description=__doc__.split("The ``rules test`` line format", 1)[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    rs = r.add_subparsers(dest="rules_command", required=True)
    lst = rs.add_parser("list", parents=[common, auth], help="the rules and their settings")
    lst.add_argument("--format", choices=["table", "json"], default="table")
    ex = rs.add_parser("explain", parents=[common, auth], help="print the SQL of a rule")
    ex.add_argument("rule")
    run = rs.add_parser("run", parents=[common, auth],
                        help="run the due windows now, or backfill a past period")
    run.add_argument("--backfill", nargs=2, metavar=("FROM", "TO"),
                     help="evaluate the windows ending between FROM and TO (ISO 8601)")
    run.add_argument("--format", choices=["table", "json"], default="table")
    test = rs.add_parser(
        "test", parents=[common], help="try rules on a JSON-lines file of events (temporary "
        "store; no credential needed)",
        description="phiaudit rules test FILE" + __doc__.split(
            "The ``rules test`` line format", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    test.add_argument("file")
    test.add_argument("--rules", action="append", default=[], metavar="FILE",
                      help="a rule file (YAML) to add; may be repeated")
    test.add_argument("--config", help="take the rules: section (settings, disabled, "
                      "rule_files) from this service configuration")
    test.add_argument("--no-builtins", action="store_true",
                      help="only the rules of --rules files")
    test.add_argument("--from", dest="start", metavar="TIME", help="first window end")
    test.add_argument("--to", dest="end", metavar="TIME", help="last window end")
    test.add_argument("--format", choices=["table", "json"], default="table")

    a = sub.add_parser("alerts", help="alerts raised by the rules")
    asub = a.add_subparsers(dest="alerts_command", required=True)
    al = asub.add_parser("list", parents=[common, auth], help="the alerts, newest first")
    al.add_argument("--since", metavar="TIME", help="only alerts raised since (ISO 8601 or "
                    "a duration such as 24h, 7d)")
    al.add_argument("--rule", help="only this rule's alerts")
    al.add_argument("--limit", type=int, default=1000)
    al.add_argument("--format", choices=["table", "json"], default="table")

    c = sub.add_parser("care", help="care relationships for the no-care-relationship rule")
    csub = c.add_subparsers(dest="care_command", required=True)
    cl = csub.add_parser("load", parents=[common, auth],
                         help="load care relationships from CSV or FHIR NDJSON "
                              "(security role)")
    cl.add_argument("file")
    cl.add_argument("--format", choices=["csv", "fhir"], default=None,
                    help="default: fhir for .ndjson/.jsonl files, else csv")


# -- helpers -------------------------------------------------------------------------------

def _time_us(value: str, what: str) -> int:
    v = value.strip()
    if v.isdigit():
        return int(v)
    try:
        t = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what}: expected an ISO 8601 date or time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return int(t.timestamp() * 1_000_000)


def _since_us(value: str | None) -> int:
    if not value:
        return 0
    v = value.strip()
    units = {"m": 60, "h": 3600, "d": 86400}
    if len(v) > 1 and v[-1] in units and v[:-1].isdigit():
        now = _dt.datetime.now(_dt.UTC).timestamp()
        return int((now - int(v[:-1]) * units[v[-1]]) * 1_000_000)
    return _time_us(v, "--since")


def _print_rows(columns: list[str], rows: list[list[Any]], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps([dict(zip(columns, r, strict=True)) for r in rows],
                                    default=str) + "\n")
        return
    cells = [[v if isinstance(v, str) else json.dumps(v, default=str) for v in r]
             for r in rows]
    widths = [min(70, max([len(c)] + [len(r[i]) for r in cells]))
              for i, c in enumerate(columns)]
    out = sys.stdout
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
              + "\n")
    for r in cells:
        out.write("  ".join((v if len(v) <= w else v[: w - 1] + "…").ljust(w)
                            for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


_TABLE_ALERT_COLUMNS = ["time", "rule_id", "severity", "alert_id", "window_start", "summary",
                        "value", "delivered_to"]


def _print_alerts(result: dict[str, Any], fmt: str) -> None:
    columns, rows = result["columns"], result["rows"]
    if fmt == "json":
        _print_rows(columns, rows, fmt)
        return
    pos = [columns.index(c) for c in _TABLE_ALERT_COLUMNS]
    shown = [[r[i] if not isinstance(r[i], list) else ",".join(r[i]) for i in pos]
             for r in rows]
    _print_rows(_TABLE_ALERT_COLUMNS, shown, fmt)


# -- through the service, or directly ------------------------------------------------------

def _load_yaml_config(path: str | None, data_dir: str, clickhouse: str) -> Any:
    from ._config import ServiceConfig, load_config

    overrides = {"data_dir": data_dir, "clickhouse_url": clickhouse or None}
    if path:
        return load_config(path, overrides)
    cfg = ServiceConfig(data_dir=data_dir, clickhouse_url=clickhouse)
    cfg.validate()
    return cfg


class _Direct:
    """The store opened directly, with a scheduler (not started) for its engine."""

    def __init__(self, args: argparse.Namespace, data_dir: str) -> None:
        from ._rules_service import RuleScheduler, RulesOps
        from ._service import open_local

        clickhouse = args.clickhouse or os.environ.get("PHIAUDIT_CLICKHOUSE_URL", "")
        cfg = _load_yaml_config(getattr(args, "config", None), data_dir, clickhouse)
        self.local = open_local(cfg)
        try:
            self.ops = RulesOps(self.local, RuleScheduler(cfg, self.local), "direct")
        except BaseException:
            self.local.close()
            raise

    def __enter__(self) -> Any:
        return self.ops

    def __exit__(self, *exc: object) -> None:
        self.local.close()


def run_command(args: argparse.Namespace, data_dir: str, token: str,
                service: dict[str, Any] | None) -> int:
    """Dispatch ``phiaudit rules|alerts|care``; ``service`` is the running service's
    ``run/service.json`` (or None)."""
    if args.command == "rules" and args.rules_command == "test":
        return _cmd_test(args)
    if service is not None and getattr(args, "config", None):
        print("phiaudit: --config is ignored: the running service's rules are used",
              file=sys.stderr)
    cmd = args.command + " " + getattr(args, f"{args.command}_command")
    if cmd == "rules list":
        result = (call_service(service, token, "/phiaudit.v1.Rules/List", {})
                  if service else _direct(args, data_dir, lambda o: o.list_rules(token)))
        _print_rows(result["columns"], result["rows"], args.format)
    elif cmd == "rules explain":
        if service:
            sql = call_service(service, token, "/phiaudit.v1.Rules/Explain",
                                {"rule": args.rule})["sql"]
        else:
            sql = _direct(args, data_dir, lambda o: o.explain(token, args.rule))
        print(sql.rstrip())
    elif cmd == "rules run":
        window = None
        if args.backfill:
            window = (_time_us(args.backfill[0], "--backfill FROM"),
                      _time_us(args.backfill[1], "--backfill TO"))
            if window[1] <= window[0]:
                raise ConfigError("--backfill: TO must be after FROM")
        result = (call_service(service, token, "/phiaudit.v1.Rules/Run",
                                {"backfill": list(window) if window else None}, timeout=3600)
                  if service else _direct(args, data_dir, lambda o: o.run(token, window)))
        if args.format == "json":
            print(json.dumps(result))
        else:
            cols = ["rule_id", "severity", "alert_id", "window_start", "window_end", "summary"]
            _print_rows(cols, [[a[c] for c in cols] for a in result["alerts"]], "table")
            print(f"{len(result['alerts'])} new alert(s) ({result['mode']}); "
                  f"{result['delivered']} delivery(ies) to sinks")
    elif cmd == "alerts list":
        if args.limit < 1:
            raise ConfigError("--limit: a positive integer")
        req = {"since_us": _since_us(args.since), "rule": args.rule or "",
               "limit": args.limit}
        result = (call_service(service, token, "/phiaudit.v1.Alerts/List", req)
                  if service else _direct(args, data_dir, lambda o: o.alerts(
                      token, since_us=req["since_us"], rule=req["rule"], limit=args.limit)))
        _print_alerts(result, args.format)
    elif cmd == "care load":
        path = Path(args.file)
        fmt = args.format or ("fhir" if path.suffix.lower() in (".ndjson", ".jsonl", ".json")
                              else "csv")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path.name}: cannot read ({exc.strerror})") from None
        if service:
            result = call_service(service, token, "/phiaudit.v1.Care/Load", {
                "format": fmt, "data": base64.b64encode(data).decode()})
        else:
            result = _direct(args, data_dir, lambda o: o.care_load(token, data, fmt))
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(result["relationships"].items()))
        print(f"loaded {result['rows']} care relationship(s) ({kinds}); batch "
              f"{result['batch_id']}")
    else:  # pragma: no cover - argparse allows nothing else
        raise ConfigError(f"unknown command {cmd}")
    return 0


def _direct(args: argparse.Namespace, data_dir: str, fn: Any) -> Any:
    with _Direct(args, data_dir) as ops:
        return fn(ops)


# -- rules test ----------------------------------------------------------------------------

def _cmd_test(args: argparse.Namespace) -> int:
    from phiaudit.rules import RuleEngine, RulesConfig, care_rows_from_bytes, load_rules
    from phiaudit.storage import (
        AccessRecord,
        AuditEvent,
        BatchWriter,
        InfraEvent,
        KeyRing,
        RecordEncoder,
        Store,
        StoreLocation,
        migrate,
    )

    from ._service import TABLES

    path = Path(args.file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not UTF-8 text") from None
    # the rules first: a bad rule file is reported before any store is made
    section: dict[str, Any] = {}
    if args.config:
        from ._config import load_config

        section = dict(load_config(args.config, {"data_dir": "unused"}).rules)
    section.pop("sinks", None)  # a test delivers nothing
    if args.no_builtins:
        section["builtins"] = False
    section["rule_files"] = list(section.get("rule_files", [])) + list(args.rules)
    config = RulesConfig.from_mapping(section)
    rules = load_rules(config)
    if not rules:
        raise ConfigError("no rules to test: give --rules FILE")

    kinds: dict[str, tuple[type, str]] = {
        "audit": (AuditEvent, "event_time_us"), "infra": (InfraEvent, "event_time_us"),
        "access": (AccessRecord, ""),
    }
    parsed: list[tuple[int, str, Any, int]] = []  # (line, type, record, time)
    care = io.StringIO()
    care_writer = csv.writer(care)
    care_writer.writerow(["actor_id", "patient_id", "start", "end", "relationship"])
    errors: list[str] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            errors.append(f"line {n}: not a JSON object")
            continue
        kind = doc.pop("type", "audit")
        if kind == "care":
            unknown = sorted(set(doc) - {"actor_id", "patient_id", "start", "end",
                                         "relationship"})
            if unknown:
                errors.append(f"line {n}: unknown field(s) for care: {', '.join(unknown)}"[:200])
                continue
            care_writer.writerow([str(doc.get(k, "") or "") for k in
                                  ("actor_id", "patient_id", "start", "end")]
                                 + [str(doc.get("relationship") or "care")])
            continue
        if kind not in kinds:
            errors.append(f"line {n}: type: audit, infra, access or care")
            continue
        cls, _ = kinds[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        t = doc.pop("time", None)
        if t is None:
            errors.append(f"line {n}: time is missing")
            continue
        try:
            t_us = _time_us(str(t), "time")
        except ConfigError:
            errors.append(f"line {n}: time is not an ISO 8601 time")
            continue
        if kind != "access":
            names -= {"event_time_us", "received_time_us"}
        unknown = sorted(set(doc) - names)
        if unknown:
            errors.append(f"line {n}: unknown field(s) for {kind}: {', '.join(unknown)}"[:200])
            continue
        try:
            if kind == "access":
                defaults = {"principal": "", "role": "", "interface": "direct",
                            "statement": "", "decrypt": False, "rows_returned": 0,
                            "outcome": "ok"}
                rec = cls(**{**defaults, **doc})
            else:
                eid = doc.pop("event_id", None)
                eid = uuid.UUID(str(eid)) if eid else uuid.uuid4()
                if kind == "audit":
                    doc.setdefault("outcome", "success")
                    if "action" not in doc:
                        raise ValueError("action")
                else:
                    doc.setdefault("source_kind", "unknown")
                rec = cls(event_id=eid, event_time_us=t_us, received_time_us=t_us, **doc)
        except (TypeError, ValueError):
            errors.append(f"line {n}: a field has the wrong type or is missing")
            continue
        parsed.append((n, kind, rec, t_us))
    if errors:
        raise PermanentError(f"{path.name}: " + "; ".join(errors[:5]) + (
            f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    if not parsed:
        raise PermanentError(f"{path.name}: no events")

    times = [t for *_, t in parsed]
    start = (_time_us(args.start, "--from") if args.start
             else min(times) // 3_600_000_000 * 3_600_000_000)
    end = _time_us(args.end, "--to") if args.end else max(times) + 86_400_000_000
    if end <= start:
        raise ConfigError("--to must be after --from")

    tmp = Path(tempfile.mkdtemp(prefix="phiaudit-rules-test-"))
    logging.getLogger("phiaudit.storage").setLevel(logging.ERROR)
    try:
        data = tmp / "data"
        data.mkdir(mode=0o700)
        ring = KeyRing.open(data)
        encoder = RecordEncoder.for_ring(ring)
        location = StoreLocation(data_dir=data, url=None, database="phiaudit",
                                 ca_file=None, disk_encryption=False)
        migrate(location)
        store = Store.open(location)
        writer = BatchWriter(store, "rules-test", TABLES)
        writer.start()
        try:
            def submit(tables: dict[str, list[list[Any]]]) -> None:
                writer.submit(None, tables).result(timeout=120)

            tables: dict[str, list[list[Any]]] = {}
            line_of: dict[str, int] = {}
            for n, kind, rec, t_us in parsed:
                if kind == "audit":
                    tables.setdefault("audit_events", []).append(encoder.audit_row(rec))
                    line_of[str(rec.event_id)] = n
                elif kind == "infra":
                    tables.setdefault("infra_events", []).append(encoder.infra_row(rec))
                    line_of[str(rec.event_id)] = n
                else:
                    row = encoder.access_row(rec, t_us)
                    tables.setdefault("access_log", []).append(row)
                    line_of[str(row[0])] = n
            if care.getvalue().count("\n") > 1:
                tables["care_relationships"] = care_rows_from_bytes(
                    care.getvalue().encode(), "csv", encoder.index, "rules-test",
                    batch_id="rules-test", name="care lines")
            submit(tables)
            engine = RuleEngine(store, submit, encoder, rules, config)
            alerts = engine.backfill(start, end)
        finally:
            writer.shutdown()
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the key ring's KEK too (tmp/data.keys)

    from ._rules_service import iso_us

    out: list[dict[str, Any]] = []
    for a in sorted(alerts, key=lambda a: (a.window_start_us, a.rule_id)):
        lines_ = sorted({line_of[str(e)] for e in a.evidence if str(e) in line_of})
        out.append({"rule_id": a.rule_id, "severity": a.severity,
                    "window_start": iso_us(a.window_start_us),
                    "window_end": iso_us(a.window_end_us), "summary": a.summary,
                    "value": a.value, "evidence_lines": lines_})
    if args.format == "json":
        print(json.dumps(out))
    else:
        cols = ["rule_id", "severity", "window_start", "window_end", "summary",
                "evidence_lines"]
        _print_rows(cols, [[o[c] if c != "evidence_lines" else
                            ",".join(map(str, o[c])) for c in cols] for o in out], "table")
        print(f"{len(out)} alert(s) from {len(rules)} rule(s) over {len(parsed)} event(s)")
    return 0
