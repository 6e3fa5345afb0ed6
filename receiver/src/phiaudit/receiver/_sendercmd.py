"""``phiaudit sender issue|revoke|list``: manage OTLP sender tokens (security role only).

``issue NAME`` prints a new token once; the sender sends it as gRPC metadata
``authorization: Bearer TOKEN`` (for the OpenTelemetry exporters:
``OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer TOKEN"``), and NAME is stored with every
event it sends (``sender`` = ``token:NAME``). A running service picks changes up within a
second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_sender_parser", "cmd_sender"]


def add_sender_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sender", parents=[common], help="manage OTLP sender tokens")
    p.add_argument("action", choices=["issue", "revoke", "list"])
    p.add_argument("name", nargs="?", help="the sender's name (stored with its events)")
    p.add_argument("--token-file", help="the security credential (default $PHIAUDIT_TOKEN)")


def cmd_sender(args: argparse.Namespace, data_dir: str, token: str) -> int:
    from phiaudit.storage import AccessDenied, ConfigError, Credentials, SenderTokens

    root = Path(data_dir).resolve()
    if Credentials(root).authenticate(token).role != "security":
        raise AccessDenied("only the security role may manage sender tokens")
    senders = SenderTokens(root)
    if args.action == "list":
        for name in senders.names():
            print(name)
        return 0
    if not args.name:
        raise ConfigError(f"sender {args.action}: give the sender's name")
    if args.action == "issue":
        print(senders.issue(args.name))
        return 0
    if not senders.revoke(args.name):
        raise ConfigError(f"sender revoke: no active token for {args.name}")
    print(f"phiaudit: revoked the tokens of {args.name}")
    return 0
