"""End to end: a real `phiaudit serve` with a `rules:` section whose webhook sink is a real
HTTP server on loopback. Failed logins sent with the OpenTelemetry SDK raise an alert on the
service's schedule; the webhook receives it in the Alertmanager v2 format; `phiaudit alerts
list`, `rules list|explain|run` and `care load` work through the service and directly; every
call needs a credential and is recorded in access_log, refused ones too."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import cli_env, run_cli, start_service, tracer_provider


class _Webhook:
    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.fail = 0  # answer 503 this many times first
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.fail > 0:
                    hook.fail -= 1
                    self.send_response(503)
                else:
                    hook.bodies.append((self.path, self.headers.get("Authorization"),
                                        json.loads(body)))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/alerts"

    def alerts(self) -> list[dict[str, Any]]:
        return [a for _, _, body in self.bodies for a in body]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    w = _Webhook()
    yield w
    w.close()


def _cli(data_dir: Path, *args: str, token: str | None) -> Any:
    env = cli_env(**({"PHIAUDIT_TOKEN": token} if token is not None else {}))
    return run_cli(*args, "--data-dir", str(data_dir), env=env)


def test_alerts_raised_delivered_listed(tmp_path: Path, webhook: _Webhook) -> None:
    config = tmp_path / "phiaudit.yaml"
    config.write_text(yaml.safe_dump({"rules": {
        "interval_s": 1, "lateness_s": 0, "step_s": 1,
        "sinks": [{"type": "webhook", "url": webhook.url,
                   "headers": {"Authorization": "Bearer hook-secret"}}],
    }}))
    data = tmp_path / "data"
    webhook.fail = 2  # Alertmanager down at first: the service retries with backoff
    svc = start_service(data, "--config", str(config))
    try:
        admin = svc.admin_token
        assert "hook-secret" not in svc.log()
        # a burst of failed logins of one user, through the real SDK and exporter
        provider = tracer_provider(svc.address)
        tracer = provider.get_tracer("ehr")
        trace_ids = []
        for _ in range(6):
            with tracer.start_as_current_span("POST /login", attributes={
                    "phi.audit.event": True, "phi.audit.action": "login",
                    "phi.audit.outcome": "failure", "enduser.id": "dr-mallory",
                    "client.address": "10.9.8.7"}) as span:
                trace_ids.append(format(span.get_span_context().trace_id, "032x"))
        provider.shutdown()

        # the scheduler raises the alert and the webhook receives it
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
                a["labels"]["alertname"] == "failed-auth-user" for a in webhook.alerts()):
            time.sleep(0.5)
        got = [a for a in webhook.alerts() if a["labels"]["alertname"] == "failed-auth-user"]
        assert len(got) == 1, svc.log()
        (alert,) = got
        path, auth, _ = webhook.bodies[0]
        assert path == "/api/v2/alerts" and auth == "Bearer hook-secret"
        assert alert["labels"]["severity"] == "medium"
        assert alert["labels"]["actor_id"] == "dr-mallory"
        assert alert["labels"]["rule_id"] == "failed-auth-user"
        assert "failed logins for user dr-mallory" in alert["annotations"]["summary"]
        assert alert["annotations"]["trace_id"] in trace_ids
        assert alert["startsAt"] < alert["endsAt"]
        assert "10.9.8.7" not in json.dumps(webhook.alerts())  # no client address in clear

        # every attempt is recorded: the two refused ones (whichever alerts they carried),
        # then one delivery of this alert; the delivered row follows the webhook's answer
        aid = alert["labels"]["alert_id"]
        deadline = time.monotonic() + 30
        while True:
            attempts = svc.rows("SELECT toString(alert_id) AS id, attempt, outcome, error, "
                                "time FROM alert_deliveries WHERE sink = 'webhook' "
                                "ORDER BY time")
            mine = [(int(r["attempt"]), r["outcome"], r["error"]) for r in attempts
                    if r["id"] == aid]
            if (mine and mine[-1][1] == "delivered") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        failed = [r for r in attempts if r["outcome"] == "failed"]
        assert {r["error"] for r in failed} == {"http_503"}
        assert len({r["time"] for r in failed}) == 2  # two refused POSTs, one row per alert
        assert mine[-1] == (len(mine), "delivered", "")
        assert all(m[1:] == ("failed", "http_503") for m in mine[:-1])

        # alerts list through the service
        res = _cli(data, "alerts", "list", "--format", "json", token=admin)
        assert res.returncode == 0, res.stderr
        listed = [a for a in json.loads(res.stdout) if a["rule_id"] == "failed-auth-user"]
        assert [a["alert_id"] for a in listed] == [alert["labels"]["alert_id"]]
        assert listed[0]["delivered_to"] == ["webhook"]
        assert listed[0]["value"] >= 5 and len(listed[0]["evidence"]) >= 5
        res = _cli(data, "alerts", "list", "--rule", "break-glass", "--since", "1h",
                   token=admin)
        assert res.returncode == 0 and "(0 rows)" in res.stdout, res.stderr

        # rules list / explain
        res = _cli(data, "rules", "list", "--format", "json", token=admin)
        assert res.returncode == 0, res.stderr
        ids = {r["id"] for r in json.loads(res.stdout)}
        assert {"failed-auth-user", "no-care-relationship", "bulk-access"} <= ids
        res = _cli(data, "rules", "explain", "failed-auth-user", token=admin)
        assert res.returncode == 0, res.stderr
        assert "SELECT" in res.stdout and "audit_events" in res.stdout
        res = _cli(data, "rules", "explain", "no-such-rule", token=admin)
        assert res.returncode == 2 and "no rule" in res.stderr

        # a backfill over the same period raises nothing new
        now = time.time()
        frm = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 900))
        to = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 60))
        res = _cli(data, "rules", "run", "--backfill", frm, to, "--format", "json",
                   token=admin)
        assert res.returncode == 0, res.stderr
        assert [a for a in json.loads(res.stdout)["alerts"]
                if a["rule_id"] == "failed-auth-user"] == []
        res = _cli(data, "rules", "run", token=admin)
        assert res.returncode == 0 and "new alert(s) (scheduled)" in res.stdout, res.stderr

        # care load: security only
        care = tmp_path / "care.csv"
        care.write_text("actor_id,patient_id,start,end\n"
                        "dr-a,pat-secret-77,2026-01-01T00:00:00Z,\n"
                        "dr-b,pat-secret-78,2026-01-01,2026-02-01\n")
        res = _cli(data, "care", "load", str(care), token=admin)
        assert res.returncode == 0, res.stderr
        assert "loaded 2 care relationship(s)" in res.stdout
        tok = run_cli("token", "--data-dir", str(data), "--role", "compliance",
                      "--principal", "auditor-1", env=cli_env(PHIAUDIT_TOKEN=admin))
        assert tok.returncode == 0, tok.stderr
        compliance = tok.stdout.strip()
        res = _cli(data, "care", "load", str(care), token=compliance)
        assert res.returncode == 2 and "security role" in res.stderr
        bad = tmp_path / "bad.csv"
        bad.write_text("actor_id,patient_id,start,end\ndr-a,pat-secret-79,soon,\n")
        res = _cli(data, "care", "load", str(bad), token=admin)
        assert res.returncode == 2 and "line 2: start is not an ISO 8601 time" in res.stderr
        assert "secret" not in res.stderr
        rows = svc.rows("SELECT actor_id, patient_bidx FROM care_relationships ORDER BY "
                        "actor_id")
        assert [r["actor_id"] for r in rows] == ["dr-a", "dr-b"]
        assert all(len(r["patient_bidx"]) == 32 for r in rows)

        # refused without a credential, and with a wrong one
        res = _cli(data, "alerts", "list", token=None)
        assert res.returncode == 2 and res.stderr.startswith("phiaudit: ")
        assert len(res.stderr.strip().splitlines()) == 1
        res = _cli(data, "rules", "run", token="phia_wrong")
        assert res.returncode == 2
        res = _cli(data, "alerts", "list", token=compliance)
        assert res.returncode == 0, res.stderr

        log = [r for r in svc.rows("SELECT principal, role, interface, statement, outcome "
                                   "FROM access_log ORDER BY time", decrypt=True)
               if r["statement"].startswith("phiaudit ")]
        seen = [(r["statement"].split(" --")[0], r["outcome"], r["interface"]) for r in log]
        assert ("phiaudit alerts list", "ok", "service") in seen
        assert ("phiaudit alerts list", "denied", "service") in seen
        assert ("phiaudit rules run", "denied", "service") in seen
        assert ("phiaudit rules explain failed-auth-user", "ok", "service") in seen
        assert ("phiaudit care load", "ok", "service") in seen
        assert ("phiaudit care load", "denied", "service") in seen
        assert ("phiaudit care load", "error", "service") in seen
        assert ("phiaudit rules list", "ok", "service") in seen
        assert not any("secret" in r["statement"] for r in log)
    finally:
        code = svc.stop()
    assert code == 0, svc.log()
    assert "Traceback" not in svc.log()

    # without a service: the store opened directly
    res = _cli(data, "alerts", "list", "--format", "json", "--rule", "failed-auth-user",
               token=admin)
    assert res.returncode == 0, res.stderr
    assert [a["alert_id"] for a in json.loads(res.stdout)] == [alert["labels"]["alert_id"]]
    res = _cli(data, "alerts", "list", token="")
    assert res.returncode == 2
    res = _cli(data, "sql", "SELECT statement, outcome FROM access_log WHERE "
               "interface = 'direct' ORDER BY time", "--decrypt", "--format", "json",
               token=admin)
    assert res.returncode == 0, res.stderr
    direct = [r["outcome"] for r in json.loads(res.stdout)
              if r["statement"].startswith("phiaudit alerts list")]
    assert direct == ["ok", "denied"]


def test_rules_test_needs_no_store(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [{"time": f"2026-03-02T03:1{i}:00Z", "action": "login", "outcome": "failure",
              "actor_id": "dr-mallory", "client_address": "10.9.8.7"} for i in range(6)]
    lines.append({"type": "care", "actor_id": "dr-a", "patient_id": "p-1",
                  "start": "2026-03-01"})
    lines.append({"time": "2026-03-02T10:00:00Z", "action": "read", "actor_id": "dr-a",
                  "patient_id": "p-1", "resource_type": "Patient"})
    lines.append({"time": "2026-03-02T11:00:00Z", "action": "read", "actor_id": "dr-b",
                  "patient_id": "p-1", "resource_type": "Patient"})
    events.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = run_cli("rules", "test", str(events), "--format", "json")
    assert res.returncode == 0, res.stderr
    alerts = {a["rule_id"]: a for a in json.loads(res.stdout)}
    assert alerts["failed-auth-user"]["evidence_lines"] == [1, 2, 3, 4, 5]
    assert alerts["no-care-relationship"]["evidence_lines"] == [9]  # dr-a has a relationship
    assert "p-1" not in res.stdout
    # a rule file of one's own, alone
    rule = tmp_path / "night.yaml"
    rule.write_text(yaml.safe_dump({
        "id": "any-read", "title": "Any read", "severity": "low", "source": "audit_events",
        "detection": {"reads": {"action": "read"}, "condition": "reads"},
        "correlation": {"type": "event_count", "group-by": ["actor_id"], "timespan": "1h",
                        "condition": {"gte": 1}},
        "summary": "{actor_id} read", }))
    res = run_cli("rules", "test", str(events), "--rules", str(rule), "--no-builtins",
                  "--format", "json")
    assert res.returncode == 0, res.stderr
    assert sorted(a["summary"] for a in json.loads(res.stdout)) == ["dr-a read", "dr-b read"]
    # bad lines: one line each, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time": "2026-03-02T03:10:00Z", "action": "login", "colour": "red"}\n'
                   "not json\n")
    res = run_cli("rules", "test", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip() == ("phiaudit: bad.jsonl: line 1: unknown field(s) for audit: "
                                  "colour; line 2: not a JSON object")
