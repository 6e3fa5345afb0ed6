"""Who sent an OTLP request: mutual-TLS certificate, sender token, or anonymous on loopback.

How a sender authenticates (config key ``otlp_auth``):

* ``auto`` (default): authentication is required when the service listens on a non-loopback
  address; on loopback an unauthenticated sender is accepted as ``anonymous``.
* ``required``: every OTLP request must be authenticated, also on loopback.

Either way a request that *presents* a sender token must present a valid one, and the answer
to an unauthenticated or badly authenticated request is UNAUTHENTICATED.

Identities (stored in the ``sender`` column of every row the request produces):

* ``mtls:NAME``: the client certificate's subject CN, else its first subjectAltName; only with
  ``tls_client_ca_file`` (mutual TLS is then required by the TLS layer itself: grpcio's Python
  server cannot request a certificate without requiring it);
* ``token:NAME``: the name a sender token was issued to (``phiaudit sender issue NAME``),
  given as gRPC metadata ``authorization: Bearer phis_...`` (the OTLP exporters' ``headers``);
* ``anonymous``: loopback only, when authentication is not required.

When both a certificate and a token are presented, the token must be valid and the
certificate identity is stored.

TLS: grpcio's BoringSSL server refuses TLS 1.0 and 1.1 (UNSUPPORTED_PROTOCOL) and offers only
AEAD cipher suites, so TLS 1.2 is the floor without any setting (proven by tests/receiver/
test_tls.py); ``GRPC_SSL_CIPHER_SUITES`` can narrow the suites further, never lower the version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from phiaudit.storage import SenderTokens

from ._config import ServiceConfig, _is_loopback

__all__ = ["ANONYMOUS", "SenderAuth", "Unauthenticated"]

ANONYMOUS = "anonymous"
_MAX_NAME = 200


class Unauthenticated(Exception):
    """The request carries no acceptable identity; the message is safe to send back."""


def _clean(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:_MAX_NAME]


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(value, str) and value[:7].lower() == "bearer ":
                return value[7:].strip()
            return ""  # present but not a bearer token: refused as invalid
    return None


class SenderAuth:
    def __init__(self, tokens: SenderTokens, *, required: bool) -> None:
        self.tokens = tokens
        self.required = required

    def __repr__(self) -> str:
        return f"SenderAuth(required={self.required}, tokens=[REDACTED])"

    @classmethod
    def from_config(cls, cfg: ServiceConfig) -> SenderAuth:
        required = cfg.otlp_auth == "required" or not _is_loopback(cfg.host)
        return cls(SenderTokens(Path(cfg.data_dir).resolve()), required=required)

    def identify(self, metadata: Iterable[tuple[str, Any]] | None,
                 auth_context: Mapping[str, Iterable[bytes]] | None) -> str:
        """The sender identity of a request, or ``Unauthenticated``."""
        token = _bearer(metadata)
        token_name: str | None = None
        if token is not None:
            token_name = self.tokens.authenticate(token)
            if token_name is None:
                raise Unauthenticated("invalid sender token")
        auth = auth_context or {}
        names = list(auth.get("x509_common_name") or ()) or \
            list(auth.get("x509_subject_alternative_name") or ())
        if names:
            return "mtls:" + _clean(names[0])
        if token_name is not None:
            return "token:" + _clean(token_name)
        if self.required:
            raise Unauthenticated("sender authentication required: present a client "
                                  "certificate or a sender token (authorization: Bearer ...)")
        return ANONYMOUS
