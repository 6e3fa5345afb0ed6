"""The command line's channel to a running service, plaintext (loopback) or TLS.

``run/service.json`` says whether the service speaks TLS and which certificate it serves.
The roots the command line trusts are, in order: ``--ca-file`` / ``$PHIAUDIT_CA_FILE``, else
the service's own certificate file, which gRPC accepts as a pinned trust anchor (also a
CA-signed leaf). The host name is always checked against the certificate: the address in
``service.json``, or ``--tls-server-name`` / ``$PHIAUDIT_TLS_SERVER_NAME`` (a service
listening on every interface is reached on loopback and checked as ``localhost``). Under
mutual TLS the command line presents ``--client-cert-file``/``--client-key-file``
(``$PHIAUDIT_CLIENT_CERT_FILE``/``$PHIAUDIT_CLIENT_KEY_FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from phiaudit.storage import AccessDenied, ConfigError, PermanentError, PhiAuditError

__all__ = ["TLS_FLAGS", "add_tls_arguments", "apply_tls_arguments", "call_service",
           "open_channel"]

#: command-line flag (argparse dest) -> environment variable
TLS_FLAGS = {
    "ca_file": "PHIAUDIT_CA_FILE",
    "client_cert_file": "PHIAUDIT_CLIENT_CERT_FILE",
    "client_key_file": "PHIAUDIT_CLIENT_KEY_FILE",
    "tls_server_name": "PHIAUDIT_TLS_SERVER_NAME",
}
_WILDCARD = {"0.0.0.0": ("127.0.0.1", "localhost"), "::": ("::1", "localhost"),  # noqa: S104
             "": ("127.0.0.1", "localhost")}


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("reaching a TLS service")
    g.add_argument("--ca-file", help="CA certificate(s) to trust (default $PHIAUDIT_CA_FILE, "
                   "else the service's own certificate)")
    g.add_argument("--client-cert-file", help="client certificate for mutual TLS")
    g.add_argument("--client-key-file", help="client key for mutual TLS")
    g.add_argument("--tls-server-name", help="host name to check the certificate against")


def apply_tls_arguments(args: argparse.Namespace) -> None:
    """Flags override the environment (which the channel, and child processes, read)."""
    for dest, env in TLS_FLAGS.items():
        value = getattr(args, dest, None)
        if value:
            os.environ[env] = str(value)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror})") from exc


def open_channel(info: dict[str, Any], options: list[tuple[str, Any]] | None = None) -> Any:
    """A gRPC channel to the service described by ``run/service.json``."""
    import grpc

    options = list(options or [])
    address = str(info["address"])
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    server_name = os.environ.get(TLS_FLAGS["tls_server_name"], "")
    if host in _WILDCARD:
        host, default_name = _WILDCARD[host]
        server_name = server_name or default_name
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not info.get("tls"):
        return grpc.insecure_channel(target, options=options)
    ca_file = os.environ.get(TLS_FLAGS["ca_file"]) or str(info.get("tls_cert_file") or "")
    if not ca_file:
        raise ConfigError("the service speaks TLS: give --ca-file")
    cert_file = os.environ.get(TLS_FLAGS["client_cert_file"], "")
    key_file = os.environ.get(TLS_FLAGS["client_key_file"], "")
    if bool(cert_file) != bool(key_file):
        raise ConfigError("--client-cert-file/--client-key-file: both or neither")
    if info.get("mtls") and not cert_file:
        raise ConfigError("the service requires mutual TLS: give --client-cert-file and "
                          "--client-key-file")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "ca_file"),
        private_key=_read(key_file, "client_key_file") if key_file else None,
        certificate_chain=_read(cert_file, "client_cert_file") if cert_file else None)
    if server_name:
        # the name the certificate is checked against; verification itself stays on
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


def call_service(info: dict[str, Any], token: str, method: str, request: dict[str, Any], *,
                 timeout: float = 300) -> Any:
    """One JSON call to the service's own methods (``/phiaudit.v1...``) with the caller's
    credential. Refused: ``AccessDenied``; a bad request: ``PermanentError``; anything else:
    ``PhiAuditError`` with the status name."""
    import grpc

    channel = open_channel(info, options=[("grpc.max_receive_message_length", 256 << 20),
                                          ("grpc.max_send_message_length", 256 << 20)])
    try:
        raw = channel.unary_unary(method)(json.dumps(request).encode(), timeout=timeout,
                                          metadata=(("authorization", f"Bearer {token}"),))
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            raise AccessDenied(exc.details()) from None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise PermanentError(exc.details()) from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise PhiAuditError("the running service is older than this command: "
                                "restart it") from None
        raise PhiAuditError(f"service: {code.name.lower()}: {exc.details()}") from None
    finally:
        channel.close()
    return json.loads(raw)
