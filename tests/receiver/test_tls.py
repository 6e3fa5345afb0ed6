"""Transport security (issue 4, point 4) with generated certificates and the real OTLP exporter:
TLS 1.2 is the floor (a TLS 1.1 client and a plaintext client are refused), mutual TLS refuses a
client without a valid certificate, sender tokens are checked (a wrong or revoked one, or a
reader token, gets UNAUTHENTICATED), the authenticated identity is stored in ``sender``, and
``phiaudit sql`` reaches a TLS service with host name checks. Plus HTTPS with certificate
verification towards a ClickHouse server."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

from tests.conftest import RunningService, cli_env, run_cli, start_service
from tests.receiver.tls_certs import Pair, TestCA

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA(d / "ca")
    stranger = TestCA(d / "stranger", name="stranger CA")
    return {
        "ca": ca,
        "server": ca.issue("phiaudit-service", server=True, hosts=("127.0.0.1", "localhost")),
        "client": ca.issue("collector-1", server=False),
        "stranger_client": stranger.issue("impostor", server=False),
    }


def _start(tmp: Path, pki: dict[str, Any], *, mtls: bool = False, listen: str = "",
           auth: str = "auto") -> RunningService:
    server: Pair = pki["server"]
    lines = [f"tls_cert_file: {server.cert}", f"tls_key_file: {server.key}", "workers: 0",
             f"otlp_auth: {auth}"]
    if mtls:
        lines.append(f"tls_client_ca_file: {pki['ca'].cert_file}")
    config = tmp / "phiaudit.yaml"
    config.write_text("\n".join(lines) + "\n")
    args = ["--config", str(config)] + (["--listen", listen] if listen else [])
    return start_service(tmp / "data", *args)


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
                ) -> Iterator[RunningService]:
    svc = _start(tmp_path_factory.mktemp("tls"), pki)
    yield svc
    assert svc.stop() == 0, svc.log()


@pytest.fixture(scope="module")
def required_service(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
                     ) -> Iterator[RunningService]:
    svc = _start(tmp_path_factory.mktemp("required"), pki, auth="required")
    yield svc
    assert svc.stop() == 0, svc.log()


@pytest.fixture(scope="module")
def mtls_service(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
                 ) -> Iterator[RunningService]:
    svc = _start(tmp_path_factory.mktemp("mtls"), pki, mtls=True)
    yield svc
    assert svc.stop() == 0, svc.log()


# ---------------------------------------------------------------- helpers

def _creds(pki: dict[str, Any], client: str | None = None) -> grpc.ChannelCredentials:
    kw: dict[str, bytes] = {"root_certificates": pki["ca"].cert_file.read_bytes()}
    if client:
        pair: Pair = pki[client]
        kw.update(private_key=pair.key.read_bytes(), certificate_chain=pair.cert.read_bytes())
    return grpc.ssl_channel_credentials(**kw)


def _export_spans(address: str, creds: grpc.ChannelCredentials, token: str | None = None,
                  patient: str = "pat-tls-1") -> SpanExportResult:
    """One audit span through the real OTLPSpanExporter; the exporter's own result."""
    headers = {"authorization": f"Bearer {token}"} if token else None
    exporter = OTLPSpanExporter(endpoint=address, credentials=creds, headers=headers,
                                timeout=10)
    results: list[SpanExportResult] = []

    class Recording(SimpleSpanProcessor):
        def on_end(self, span: Any) -> None:
            results.append(exporter.export((span,)))

    provider = TracerProvider(resource=Resource.create({"service.name": "ehr-api"}))
    provider.add_span_processor(Recording(exporter))
    attrs = {"phi.audit.event": True, "phi.audit.action": "read", "phi.patient.id": patient,
             "phi.resource.type": "Patient", "enduser.id": "dr.tls"}
    with provider.get_tracer("ehr").start_as_current_span("GET /fhir/Patient", attributes=attrs):
        pass
    provider.shutdown()
    assert len(results) == 1
    return results[0]


def _raw_export(address: str, creds: grpc.ChannelCredentials | None,
                metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """A bare OTLP Export call: the status code the service answers (OK or the error)."""
    req = trace_service_pb2.ExportTraceServiceRequest().SerializeToString()
    ch = (grpc.secure_channel(address, creds) if creds is not None
          else grpc.insecure_channel(address))
    try:
        ch.unary_unary(EXPORT)(req, timeout=10, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    finally:
        ch.close()


def _cli_env(svc: RunningService, pki: dict[str, Any] | None, **extra: str) -> dict[str, str]:
    env = cli_env(PHIAUDIT_TOKEN=svc.admin_token, **extra)
    if pki is not None:
        env["PHIAUDIT_CA_FILE"] = str(pki["ca"].cert_file)
    return env


def _senders(svc: RunningService, env: dict[str, str]) -> list[str]:
    res = run_cli("sql", "--data-dir", str(svc.data_dir), "--format", "json",
                  "SELECT sender FROM audit_events ORDER BY sender", env=env)
    assert res.returncode == 0, res.stderr
    return [r["sender"] for r in json.loads(res.stdout)]


def _issue_sender(svc: RunningService, name: str) -> str:
    res = run_cli("sender", "issue", name, "--data-dir", str(svc.data_dir),
                  env=_cli_env(svc, None))
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert token.startswith("phis_")
    time.sleep(1.2)  # the service re-reads the sender file at most once a second
    return token


def _handshake(port: int, version: ssl.TLSVersion, cafile: Path | None = None) -> str:
    """Force exactly ``version``; the negotiated version, or raise on a refused handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer the old protocols at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        return str(tls.version())


def _local_openssl_speaks(version: ssl.TLSVersion, pair: Pair) -> bool:
    """Control: can this Python's OpenSSL complete a ``version`` handshake at all?"""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pair.cert, pair.key)
    sctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sctx.minimum_version = ssl.TLSVersion.TLSv1
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as t:
                t.recv(1)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        return _handshake(port, version) == {ssl.TLSVersion.TLSv1_1: "TLSv1.1",
                                              ssl.TLSVersion.TLSv1: "TLSv1"}[version]
    except (OSError, ssl.SSLError):
        return False
    finally:
        listener.close()
        thread.join(5)


# ---------------------------------------------------------------- the TLS floor

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1])
def test_tls_below_1_2_is_refused(tls_service: RunningService, pki: dict[str, Any],
                                  version: ssl.TLSVersion) -> None:
    # the control proves the refusal below comes from the service, not from this OpenSSL
    if not _local_openssl_speaks(version, pki["server"]):
        pytest.skip(f"this Python's OpenSSL cannot speak {version.name} at all")
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(tls_service.port, version)
    # and the floor is exactly 1.2: a 1.2 client (verifying the certificate) gets in
    assert _handshake(tls_service.port, ssl.TLSVersion.TLSv1_2,
                      cafile=pki["ca"].cert_file) == "TLSv1.2"
    assert _handshake(tls_service.port, ssl.TLSVersion.TLSv1_3,
                      cafile=pki["ca"].cert_file) == "TLSv1.3"


def test_plaintext_client_is_refused_by_a_tls_port(tls_service: RunningService) -> None:
    assert _raw_export(tls_service.address, None) == grpc.StatusCode.UNAVAILABLE
    assert "TLS" in tls_service.log() and "plaintext" not in tls_service.log()


def test_client_that_does_not_trust_the_server_is_refused(tls_service: RunningService,
                                                          pki: dict[str, Any]) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki["stranger_client"].cert
                                         .read_bytes())
    assert _raw_export(tls_service.address, creds) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- tokens and identities

def test_loopback_without_auth_is_anonymous_but_a_wrong_token_is_refused(
        tls_service: RunningService, pki: dict[str, Any]) -> None:
    creds = _creds(pki)
    assert _raw_export(tls_service.address, creds,
                       (("authorization", "Bearer phis_wrong"),)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _export_spans(tls_service.address, creds) == SpanExportResult.SUCCESS
    token = _issue_sender(tls_service, "lab-system")
    assert _export_spans(tls_service.address, creds, token) == SpanExportResult.SUCCESS
    assert _senders(tls_service, _cli_env(tls_service, pki)) == ["anonymous", "token:lab-system"]


def test_tokens_when_auth_is_required(required_service: RunningService,
                                      pki: dict[str, Any]) -> None:
    svc, creds = required_service, _creds(pki)
    assert _raw_export(svc.address, creds) == grpc.StatusCode.UNAUTHENTICATED
    assert _export_spans(svc.address, creds) == SpanExportResult.FAILURE
    assert _export_spans(svc.address, creds, "phis_not-a-real-token") == \
        SpanExportResult.FAILURE
    assert _raw_export(svc.address, creds, (("authorization", "Basic abc"),)) == \
        grpc.StatusCode.UNAUTHENTICATED
    # a reader credential is not a sender credential
    assert _raw_export(svc.address, creds, (("authorization", f"Bearer {svc.admin_token}"),)) \
        == grpc.StatusCode.UNAUTHENTICATED
    ehr = _issue_sender(svc, "ehr-api")
    billing = _issue_sender(svc, "billing")
    assert _export_spans(svc.address, creds, ehr) == SpanExportResult.SUCCESS
    assert _export_spans(svc.address, creds, billing, patient="pat-tls-2") == \
        SpanExportResult.SUCCESS
    env = _cli_env(svc, pki)
    assert _senders(svc, env) == ["token:billing", "token:ehr-api"]
    # a sender token cannot read the trail
    res = run_cli("sql", "--data-dir", str(svc.data_dir), "SELECT 1",
                  env=_cli_env(svc, pki) | {"PHIAUDIT_TOKEN": ehr})
    assert res.returncode == 2 and "invalid credential" in res.stderr
    # revoked: refused from the next second on
    res = run_cli("sender", "revoke", "billing", "--data-dir", str(svc.data_dir),
                  env=_cli_env(svc, None))
    assert res.returncode == 0, res.stderr
    time.sleep(1.2)
    assert _raw_export(svc.address, creds, (("authorization", f"Bearer {billing}"),)) == \
        grpc.StatusCode.UNAUTHENTICATED
    # tokens are stored hashed only, mode 0600, never logged
    stored = svc.data_dir / "credentials" / "senders.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    for secret in (ehr, billing):
        assert secret not in stored.read_text()
        assert secret not in svc.log()
    assert "pat-tls" not in svc.log()


def test_mutual_tls(mtls_service: RunningService, pki: dict[str, Any]) -> None:
    svc = mtls_service
    # no client certificate, or one from another CA: the handshake itself fails
    assert _raw_export(svc.address, _creds(pki)) == grpc.StatusCode.UNAVAILABLE
    assert _raw_export(svc.address, _creds(pki, "stranger_client")) == \
        grpc.StatusCode.UNAVAILABLE
    assert _export_spans(svc.address, _creds(pki, "stranger_client")) == \
        SpanExportResult.FAILURE
    # the right certificate: accepted, and its subject CN is the stored identity
    assert _export_spans(svc.address, _creds(pki, "client")) == SpanExportResult.SUCCESS
    client: Pair = pki["client"]
    env = _cli_env(svc, pki, PHIAUDIT_CLIENT_CERT_FILE=str(client.cert),
                   PHIAUDIT_CLIENT_KEY_FILE=str(client.key))
    assert _senders(svc, env) == ["mtls:collector-1"]
    # the command line without a client certificate: one clear line, exit 2
    res = run_cli("sql", "--data-dir", str(svc.data_dir), "SELECT 1", env=_cli_env(svc, pki))
    assert res.returncode == 2 and "mutual TLS" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------- the command line over TLS

def test_cli_reaches_a_tls_service_with_host_name_checks(tls_service: RunningService,
                                                          pki: dict[str, Any]) -> None:
    svc = tls_service
    ok = run_cli("sql", "--data-dir", str(svc.data_dir), "--ca-file", str(pki["ca"].cert_file),
                 "SELECT 41 + 1 AS x", env=_cli_env(svc, None))
    assert ok.returncode == 0, ok.stderr
    assert "42" in ok.stdout
    # without --ca-file: the service's own certificate from run/service.json is pinned
    res = run_cli("sql", "--data-dir", str(svc.data_dir), "SELECT 1", env=_cli_env(svc, None))
    assert res.returncode == 0, res.stderr
    # a CA that did not sign the service's certificate: refused, one clear line
    res = run_cli("sql", "--data-dir", str(svc.data_dir), "--ca-file",
                  str(pki["stranger_client"].cert), "SELECT 1", env=_cli_env(svc, None))
    assert res.returncode == 1 and "unavailable" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # the certificate does not name this host: refused
    res = run_cli("sql", "--data-dir", str(svc.data_dir), "--tls-server-name", "db.example",
                  "SELECT 1", env=_cli_env(svc, pki))
    assert res.returncode == 1 and "unavailable" in res.stderr, res.stderr


def test_off_loopback_tls_requires_auth_and_cli_checks_localhost(
        tmp_path: Path, pki: dict[str, Any]) -> None:
    svc = _start(tmp_path, pki, listen="0.0.0.0:0")  # TLS; auth is then required
    try:
        host_port = f"127.0.0.1:{svc.port}"
        assert _raw_export(host_port, _creds(pki)) == grpc.StatusCode.UNAUTHENTICATED
        token = _issue_sender(svc, "gateway")
        assert _export_spans(host_port, _creds(pki), token) == SpanExportResult.SUCCESS
        assert _senders(svc, _cli_env(svc, pki)) == ["token:gateway"]
    finally:
        assert svc.stop() == 0, svc.log()


def test_bad_otlp_auth_value_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("otlp_auth: maybe\nclickhouse_ca_file: /nonexistent/ca.pem\n")
    res = run_cli("serve", "--data-dir", str(tmp_path / "data"), "--config", str(config))
    assert res.returncode == 2
    assert "otlp_auth:" in res.stderr and "clickhouse_ca_file: no such file" in res.stderr


# ---------------------------------------------------------------- ClickHouse over HTTPS

class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(500)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("hosts", [("127.0.0.1", "localhost"), ("db.example",)])
def test_clickhouse_https_verifies_the_certificate(tmp_path: Path, pki: dict[str, Any],
                                                   hosts: tuple[str, ...]) -> None:
    from phiaudit.storage import PhiAuditError, StoreLocation
    from phiaudit.storage._store import _server_client

    ca: TestCA = pki["ca"]
    cert = ca.issue("clickhouse-" + hosts[0], server=True, hosts=hosts)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert.cert, cert.key)
    httpd.socket = sctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"https://reader:s3cret@127.0.0.1:{httpd.server_address[1]}/phiaudit"
    try:
        _Recorder.seen = []
        with pytest.raises(PhiAuditError) as untrusted:  # the system roots do not know our CA
            _server_client(StoreLocation(url=url))
        assert _Recorder.seen == []  # no request got past the handshake
        assert "s3cret" not in str(untrusted.value)
        # our fake server answers 500; what matters is whether a request arrived
        with contextlib.suppress(PhiAuditError):
            _server_client(StoreLocation(url=url, ca_file=str(ca.cert_file)))
        if "127.0.0.1" in hosts:
            assert _Recorder.seen, "with clickhouse_ca_file the TLS handshake must succeed"
        else:
            assert _Recorder.seen == []  # trusted CA, wrong host name: still refused
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_sender_tokens_need_the_security_role(tls_service: RunningService) -> None:
    svc = tls_service
    no_token = run_cli("sender", "issue", "x", "--data-dir", str(svc.data_dir),
                       env=cli_env())
    assert no_token.returncode == 2 and "no credential" in no_token.stderr
    issued = run_cli("token", "--role", "compliance", "--principal", "auditor",
                     "--data-dir", str(svc.data_dir), env=_cli_env(svc, None))
    assert issued.returncode == 0, issued.stderr
    res = run_cli("sender", "issue", "x", "--data-dir", str(svc.data_dir),
                  env=cli_env(PHIAUDIT_TOKEN=issued.stdout.strip()))
    assert res.returncode == 2 and "security role" in res.stderr
    listed = run_cli("sender", "list", "--data-dir", str(svc.data_dir), env=_cli_env(svc, None))
    assert listed.returncode == 0 and "x" not in listed.stdout.split()
