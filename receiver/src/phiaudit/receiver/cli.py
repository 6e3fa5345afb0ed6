"""The ``phiaudit`` command line (CONTRACT.md section 3).

Exit codes: 0 success, 2 bad usage or refused access, 1 any other failure. Errors are one line
on stderr, never a traceback, and never contain PHI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

ENV_TOKEN = "PHIAUDIT_TOKEN"  # noqa: S105 - the variable's name, not a secret
ENV_DATA_DIR = "PHIAUDIT_DATA_DIR"
ENV_CLICKHOUSE_URL = "PHIAUDIT_CLICKHOUSE_URL"


class _Usage(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help=f"embedded store directory (default ${ENV_DATA_DIR}, "
                        "else ./phiaudit-data)")
    common.add_argument("--clickhouse", metavar="URL",
                        help=f"ClickHouse server URL (default ${ENV_CLICKHOUSE_URL})")
    from ._client import add_tls_arguments
    from ._sendercmd import add_sender_parser

    add_tls_arguments(common)
    p = argparse.ArgumentParser(prog="phiaudit", description="PHI audit trail on OpenTelemetry")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[common], help="run the OTLP receiver and the store")
    s.add_argument("--config", help="YAML configuration file")
    s.add_argument("--listen", metavar="HOST:PORT", help="OTLP gRPC address (127.0.0.1:4317)")
    q = sub.add_parser("sql", parents=[common], help="read-only SQL over the audit trail")
    q.add_argument("query")
    q.add_argument("--decrypt", action="store_true", help="return PHI fields in clear")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument("--token-file", help=f"file holding the credential (default ${ENV_TOKEN})")
    m = sub.add_parser("migrate", parents=[common],
                       help="create or upgrade the schema (server mode: an administrator URL)")
    del m
    add_sender_parser(sub, common)
    from ._verify_cli import add_parsers as add_verify_parsers

    add_verify_parsers(sub, common)
    from ._retention_cli import add_parsers as add_retention_parsers

    add_retention_parsers(sub, common)
    from ._rules_cli import add_parsers as add_rules_parsers

    add_rules_parsers(sub, common)
    t = sub.add_parser("token", parents=[common], help="issue a credential for a role")
    t.add_argument("--role", required=True, choices=["security", "compliance"])
    t.add_argument("--principal", required=True, help="who the credential is for")
    t.add_argument("--token-file", help="the issuing security credential")
    return p


def _data_dir(args: argparse.Namespace) -> str:
    return str(args.data_dir or os.environ.get(ENV_DATA_DIR) or "phiaudit-data")


def _token(args: argparse.Namespace) -> str:
    if getattr(args, "token_file", None):
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise _Usage(f"cannot read the token file ({exc.strerror})") from exc
    return os.environ.get(ENV_TOKEN, "").strip()


def _running_service(data_dir: str) -> dict[str, Any] | None:
    run = Path(data_dir).resolve() / "run" / "service.json"
    try:
        info: dict[str, Any] = json.loads(run.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info


def _query_service(info: dict[str, Any], token: str, sql: str, decrypt: bool) -> dict[str, Any]:
    from phiaudit.storage import PermanentError

    from ._client import call_service

    try:
        result: dict[str, Any] = call_service(info, token, "/phiaudit.v1.Query/Sql",
                                              {"sql": sql, "decrypt": decrypt})
    except PermanentError as exc:  # the statement itself was refused: bad usage
        raise _Usage(str(exc)) from None
    return result


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | dict):
        return json.dumps(v, default=str)
    return str(v)


def _print(columns: list[str], rows: list[list[Any]], fmt: str) -> None:
    out = sys.stdout
    if fmt == "json":
        out.write(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str))
        out.write("\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(v) for v in r])
        out.write(buf.getvalue())
        return
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [min(60, max([len(c)] + [len(r[i]) for r in cells])) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for r in cells:
        line = "  ".join((v if len(v) <= w else v[: w - 1] + "…").ljust(w)
                         for v, w in zip(r, widths, strict=True))
        out.write(line.rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._config import load_config
    from ._service import run_service

    overrides = {"listen": args.listen, "data_dir": args.data_dir,
                 "clickhouse_url": args.clickhouse}
    config = load_config(args.config, overrides)
    run_service(config)
    return 0


def _local_config(args: argparse.Namespace) -> Any:
    from ._config import ServiceConfig

    cfg = ServiceConfig(data_dir=_data_dir(args),
                        clickhouse_url=args.clickhouse or os.environ.get(ENV_CLICKHOUSE_URL, ""))
    cfg.validate()
    return cfg


def _cmd_sql(args: argparse.Namespace) -> int:
    token = _token(args)
    info = _running_service(_data_dir(args))
    if info is not None:
        result = _query_service(info, token, args.query, args.decrypt)
        _print(result["columns"], result["rows"], args.format)
        return 0
    from ._service import open_local

    local = open_local(_local_config(args))
    try:
        res = local.gateway.run(token, args.query, decrypt=args.decrypt, interface="direct")
    finally:
        local.close()
    _print(res.columns, res.rows, args.format)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from phiaudit.storage import StoreLocation, migrate

    url = args.clickhouse or os.environ.get(ENV_CLICKHOUSE_URL) or None
    location = StoreLocation(data_dir=None if url else Path(_data_dir(args)).resolve(), url=url)
    migrate(location)
    print("phiaudit: schema is up to date")
    return 0


def _cmd_retention(args: argparse.Namespace) -> int:
    from ._retention_cli import run_retention
    from ._service import open_local

    if _running_service(_data_dir(args)) is not None:
        raise _Usage("retention works on the store directly: stop the service first")
    return run_retention(args, lambda: open_local(_local_config(args)), _token(args))


def _cmd_keys(args: argparse.Namespace) -> int:
    from ._retention_cli import run_keys

    return run_keys(args, Path(_data_dir(args)).resolve(), _token(args))


def _cmd_token(args: argparse.Namespace) -> int:
    from phiaudit.storage import AccessDenied, Credentials

    creds = Credentials(Path(_data_dir(args)).resolve())
    who = creds.authenticate(_token(args))
    if who.role != "security":
        raise AccessDenied("only the security role may issue credentials")
    print(creds.issue(args.principal, args.role))
    return 0


def _cmd_sender(args: argparse.Namespace) -> int:
    from ._sendercmd import cmd_sender

    return cmd_sender(args, _data_dir(args), _token(args))


def _cmd_verify(args: argparse.Namespace) -> int:
    from ._verify_cli import cmd_prove, cmd_verify

    return (cmd_verify if args.command == "verify" else cmd_prove)(args, _data_dir(args))


def _cmd_rules(args: argparse.Namespace) -> int:
    from ._rules_cli import run_command

    data_dir = _data_dir(args)
    return run_command(args, data_dir, _token(args), _running_service(data_dir))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)
    try:
        args = _parser().parse_args(argv)
        from ._client import apply_tls_arguments

        apply_tls_arguments(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    from phiaudit.storage import AccessDenied, ConfigError, PermanentError, PhiAuditError

    commands = {"serve": _cmd_serve, "sql": _cmd_sql, "token": _cmd_token,
                "migrate": _cmd_migrate, "sender": _cmd_sender,
                "verify": _cmd_verify, "prove": _cmd_verify,
                "retention": _cmd_retention, "keys": _cmd_keys,
                "rules": _cmd_rules, "alerts": _cmd_rules, "care": _cmd_rules}
    try:
        return commands[args.command](args)
    except (AccessDenied, _Usage) as exc:
        print(f"phiaudit: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"phiaudit: {exc}", file=sys.stderr)
        return 2
    except PermanentError as exc:
        print(f"phiaudit: {exc}", file=sys.stderr)
        return 2
    except PhiAuditError as exc:
        print(f"phiaudit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"phiaudit: {type(exc).__name__}: {exc.strerror or 'system error'}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
