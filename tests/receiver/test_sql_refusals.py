"""`phiaudit sql` refuses what it must, through the running service and directly (no service
running): exit 2, one clean line on stderr, no traceback; every call, refused ones too, is in
``access_log`` (principal, outcome, rows, interface) with the statement encrypted unless
``--decrypt``; credentials issued with `phiaudit token` carry their role."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningService, cli_env, run_cli, start_service, tracer_provider

BOGUS_TOKEN = "phia_" + "x" * 43
REFUSED = [  # (statement, token kind, expected outcome, words of the error line)
    ("SELECT count() AS no_token FROM audit_events", "none", "denied", "no credential"),
    ("SELECT count() AS bad_token FROM audit_events", "bogus", "denied", "invalid credential"),
    ("ALTER TABLE audit_events DELETE WHERE 1", "admin", "denied", "only SELECT"),
    ("INSERT INTO audit_events (action) VALUES ('read')", "admin", "denied", "only SELECT"),
    ("SELECT 1; SELECT 2", "admin", "denied", "one statement"),
    ("SELECT 1 INTO OUTFILE '/tmp/phiaudit-outfile-probe'", "admin", "denied", "OUTFILE"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "admin", "error", "497"),
    # ~800 MB in one array: more than a query may use beside the ingestion (query_memory_mb)
    ("SELECT length(range(200000000)) AS too_big", "admin", "error", "query_memory_mb"),
]
ALL_REFUSED = {s for s, _, _, _ in REFUSED}


def _sql(data_dir: Path, query: str, token: str | None, *flags: str
         ) -> Any:
    env = cli_env() if token is None else cli_env(PHIAUDIT_TOKEN=token)
    return run_cli("sql", "--data-dir", str(data_dir), *flags, query, env=env)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("phiaudit: ")
    return lines[0]


def _token_for(kind: str, admin: str) -> str | None:
    return {"none": None, "bogus": BOGUS_TOKEN, "admin": admin}[kind]


def _issue(data_dir: Path, issuer: str | None, role: str, principal: str) -> Any:
    env = cli_env() if issuer is None else cli_env(PHIAUDIT_TOKEN=issuer)
    return run_cli("token", "--role", role, "--principal", principal,
                   "--data-dir", str(data_dir), env=env)


def _access_log(data_dir: Path, token: str, decrypt: bool) -> list[dict[str, Any]]:
    flags = ["--format", "json"] + (["--decrypt"] if decrypt else [])
    res = _sql(data_dir, "SELECT principal, role, interface, outcome, rows_returned, "
               "statement, reason, seq FROM access_log ORDER BY seq", token, *flags)
    assert res.returncode == 0, res.stderr
    out: list[dict[str, Any]] = json.loads(res.stdout)
    return out


def _check_refusals(data_dir: Path, admin: str) -> None:
    for statement, kind, _, words in REFUSED:
        res = _sql(data_dir, statement, _token_for(kind, admin))
        assert res.returncode == 2, (statement, res.stderr)
        assert res.stdout == ""
        assert words in _one_line(res.stderr), statement
    assert not Path("/tmp/phiaudit-outfile-probe").exists()


def _check_access_log(data_dir: Path, token: str, interface: str,
                      ok_calls: list[tuple[str, str, int]]) -> None:
    """Every refused call and every ``(statement, principal, rows)`` ok call is recorded."""
    clear = _access_log(data_dir, token, decrypt=True)
    by_statement: dict[str, list[dict[str, Any]]] = {}
    for r in clear:
        by_statement.setdefault(r["statement"], []).append(r)
    for statement, kind, outcome, _ in REFUSED:
        principal = "security-admin" if kind == "admin" else "(unauthenticated)"
        hits = [r for r in by_statement.get(statement, []) if r["principal"] == principal]
        assert len(hits) == 1, (statement, by_statement.get(statement))
        r = hits[0]
        assert (r["outcome"], r["rows_returned"], r["interface"]) == (outcome, 0, interface)
        assert r["reason"]
    for statement, principal, rows in ok_calls:
        hits = [r for r in by_statement.get(statement, []) if r["outcome"] == "ok"]
        assert len(hits) == 1, statement
        assert (hits[0]["principal"], hits[0]["rows_returned"], hits[0]["interface"]) == (
            principal, rows, interface)
    assert all(r["interface"] == interface for r in clear)
    # without --decrypt the statement is ciphertext, never the query text
    sealed = _access_log(data_dir, token, decrypt=False)
    assert len(sealed) >= len(clear)
    for r in sealed[: len(clear)]:
        assert r["statement"].startswith("enc:"), r
        assert "audit_events" not in r["statement"] and "passwd" not in r["statement"]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    service = start_service(tmp_path_factory.mktemp("sql") / "data")
    provider = tracer_provider(service.address)
    with provider.get_tracer("ehr").start_as_current_span("GET /fhir/Patient", attributes={
            "phi.audit.event": True, "phi.audit.action": "read",
            "phi.patient.id": "syn-pat-sql-0001", "enduser.id": "dr.sql"}):
        pass
    provider.shutdown()
    yield service
    code = service.stop()
    assert code == 0, service.log()
    assert "syn-pat-sql-0001" not in service.log()


def test_refusals_through_the_service(svc: RunningService) -> None:
    admin = svc.admin_token
    _check_refusals(svc.data_dir, admin)
    count = "SELECT count() AS n FROM audit_events"
    assert svc.rows(count) == [{"n": 1}]  # the ALTER ... DELETE did nothing
    _check_access_log(svc.data_dir, admin, "service", [(count, "security-admin", 1)])


def test_compliance_credential_through_the_service(svc: RunningService) -> None:
    admin = svc.admin_token
    issued = _issue(svc.data_dir, admin, "compliance", "alice")
    assert issued.returncode == 0, issued.stderr
    alice = issued.stdout.strip()
    assert alice.startswith("phia_") and alice != admin
    query = "SELECT action, patient_id FROM audit_events"
    res = _sql(svc.data_dir, query, alice, "--format", "json", "--decrypt")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [{"action": "read", "patient_id": "syn-pat-sql-0001"}]
    # a compliance credential cannot issue credentials, nor can no credential
    for issuer in (alice, None, BOGUS_TOKEN):
        res = _issue(svc.data_dir, issuer, "security", "mallory")
        assert res.returncode == 2, res.stderr
        assert res.stdout == ""
        _one_line(res.stderr)
    log = _access_log(svc.data_dir, admin, decrypt=True)
    mine = [r for r in log if r["principal"] == "alice"]
    assert [(r["role"], r["outcome"], r["rows_returned"], r["statement"]) for r in mine] == [
        ("compliance", "ok", 1, query)]
    tokens = json.loads((svc.data_dir / "credentials" / "tokens.json").read_text())["tokens"]
    assert "mallory" not in {t["principal"] for t in tokens}
    assert alice not in json.dumps(tokens)  # stored as a digest only


def test_refusals_directly_without_a_service(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # the first call creates the store, its keys and the admin credential (and says so)
    first = _sql(data, "SELECT 1", None)
    assert first.returncode == 2 and "Traceback" not in first.stderr
    admin = (data / "credentials" / "admin.token").read_text().strip()
    assert not (data / "run" / "service.json").exists()
    _check_refusals(data, admin)
    issued = _issue(data, admin, "compliance", "alice")
    assert issued.returncode == 0, issued.stderr
    alice = issued.stdout.strip()
    count = "SELECT count() AS n FROM access_log"
    res = _sql(data, count, alice, "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["n"] == len(REFUSED) + 1
    res = _issue(data, alice, "security", "mallory")
    assert res.returncode == 2 and "security role" in _one_line(res.stderr)
    _check_access_log(data, admin, "direct", [(count, "alice", 1)])
