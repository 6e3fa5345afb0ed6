"""`make demo`: the whole product in one minute, on this machine.

1. starts ``phiaudit serve`` on a free loopback port with an embedded store in a temporary
   directory (or ``--data-dir``);
2. runs the sample FHIR application (Flask + SQLite, instrumented only by the OpenTelemetry
   Flask/sqlite3 instrumentations plus phiaudit) and drives realistic traffic through it:
   logins (some failed), reads, searches returning several patients, an update, a create, a
   disclosure to an insurer, a bulk export, an unauthorised read;
3. stops the service cleanly (SIGTERM: everything acknowledged is flushed);
4. prints what a compliance officer would see, through ``phiaudit sql`` with the initial
   ``security`` credential: counts by action and outcome, failed logins, disclosures, a
   decrypted sample, and the access log of these very queries; then ``phiaudit verify``.

All data is synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "instrumentation"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHIAUDIT_", "OTEL_"))}
    env.update(extra)
    return env


def _start(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    run_file = data_dir / "run" / "service.json"
    log = open(data_dir.parent / "service.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "phiaudit.receiver", "serve", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: the service exited with {proc.returncode}; see {log.name}")
        try:
            info = json.loads(run_file.read_text())
            if info["pid"] == proc.pid:
                return proc, str(info["address"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    sys.exit("demo: the service did not start in time")


def _sql(data_dir: Path, query: str, *flags: str) -> list[dict[str, Any]]:
    token = (data_dir / "credentials" / "admin.token").read_text().strip()
    res = subprocess.run(
        [sys.executable, "-m", "phiaudit.receiver", "sql", "--data-dir", str(data_dir),
         "--format", "json", *flags, query],
        capture_output=True, text=True, env=_env(PHIAUDIT_TOKEN=token), check=False)
    if res.returncode != 0:
        sys.exit(f"demo: phiaudit sql failed: {res.stderr.strip()}")
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title}")
    if not rows:
        print("   (none)")
        return
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("   " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in cells:
        print("   " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _traffic(address: str, rounds: int) -> Any:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from sample.app import create_app, sample_config
    from sample.traffic import drive_traffic

    from phiaudit.instrumentation import configure

    provider = TracerProvider(resource=Resource.create(
        {"service.name": "sample-fhir", "host.name": "demo-host"}))
    audit = configure(OTLPSpanExporter(endpoint=address, insecure=True),
                      config=sample_config(), tracer_provider=provider)
    app = create_app(tracer_provider=provider)
    summary = drive_traffic(app.test_client(), rounds=rounds)
    audit.force_flush()
    audit.shutdown()
    provider.shutdown()
    return summary


def _phiaudit(data_dir: Path, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phiaudit.receiver", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=_env(PHIAUDIT_TOKEN=token), check=False)


def _rules(data_dir: Path, token: str) -> None:
    """The clinicians' care relationships, then the built-in rules over the demo's traffic."""
    # (grouped by the blind index: each ciphertext of the same patient id differs)
    care = _sql(data_dir, "SELECT actor_id, any(patient_id) AS patient_id FROM audit_events "
                "WHERE action IN ('read', 'search', 'update') AND outcome = 'success' "
                "AND patient_bidx != '' GROUP BY actor_id, patient_bidx "
                "ORDER BY actor_id, patient_bidx", "--decrypt")
    # every patient the clinicians saw is theirs, but one: that access has no care relationship
    care_file = data_dir.parent / "care.csv"
    lines = ["actor_id,patient_id,start,end"]
    lines += [f"{r['actor_id']},{r['patient_id']},2000-01-01," for r in care[1:]]
    care_file.write_text("\n".join(lines) + "\n")
    loaded = _phiaudit(data_dir, token, "care", "load", str(care_file), "--format", "csv")
    care_file.unlink()
    print("\n== care relationships: phiaudit care load (patients stored as blind indexes)")
    print("   " + (loaded.stdout.strip() or loaded.stderr.strip()))
    now = time.time()
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600))
    ran = _phiaudit(data_dir, token, "rules", "run", "--backfill", since, until)
    print("\n== phiaudit rules run --backfill (the built-in rules over the last hour)")
    print("   " + (ran.stdout.strip() or ran.stderr.strip()).replace("\n", "\n   "))
    listed = _phiaudit(data_dir, token, "alerts", "list")
    print("\n== phiaudit alerts list")
    print("   " + (listed.stdout.strip() or listed.stderr.strip()).replace("\n", "\n   "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="phiaudit demo")
    parser.add_argument("--data-dir", help="keep the store here (default: a temporary dir)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="phiaudit-demo-")
    data_dir = Path(args.data_dir).resolve() if args.data_dir else Path(tmp) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PHIAUDIT_SPOOL_DIR", str(Path(tmp) / "app-spool"))

    print(f"demo: starting phiaudit serve (embedded store in {data_dir})")
    proc, address = _start(data_dir)
    print(f"demo: service on {address}; driving {args.rounds} rounds of synthetic FHIR traffic")
    summary = _traffic(address, args.rounds)
    print(f"demo: the app sent {summary.audit_events} PHI requests "
          f"({dict(sorted(summary.actions.items()))}) touching "
          f"{len(summary.patient_ids)} patients, and {summary.non_phi_requests} non-PHI requests")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    print(f"demo: service stopped cleanly (exit {code})")
    if code != 0:
        return 1

    print("\nWhat a compliance officer sees (phiaudit sql, security role):")
    _table("audit events by action and outcome", _sql(
        data_dir, "SELECT action, outcome, count() AS events, uniqExact(patient_bidx) AS "
        "patients FROM audit_events GROUP BY action, outcome ORDER BY action, outcome"))
    _table("failed authentication and access", _sql(
        data_dir, "SELECT actor_id, action, http_status, count() AS attempts FROM audit_events "
        "WHERE outcome = 'failure' GROUP BY ALL ORDER BY attempts DESC"))
    _table("disclosures (accounting of disclosures, decrypted)", _sql(
        data_dir, "SELECT event_time, actor_id, patient_id, recipient, purpose, record_count "
        "FROM audit_events WHERE action IN ('disclose', 'export') ORDER BY event_time",
        "--decrypt"))
    _table("a decrypted sample of reads and searches", _sql(
        data_dir, "SELECT event_time, actor_id, action, resource_type, resource_id, patient_id,"
        " client_address, outcome FROM audit_events WHERE action IN ('read', 'search') "
        "ORDER BY event_time LIMIT 8", "--decrypt"))
    _table("the same rows as stored (PHI fields are AES-256-GCM ciphertexts)", [
        {k: (v[:28] + "...") if isinstance(v, str) and len(v) > 28 else v for k, v in r.items()}
        for r in _sql(data_dir, "SELECT resource_id, patient_id, client_address, seq, "
                      "lower(hex(hash)) AS chain_hash FROM audit_events ORDER BY seq LIMIT 3")])
    _table("access log: every read of the trail, these queries included", _sql(
        data_dir, "SELECT principal, role, interface, decrypt, rows_returned, outcome "
        "FROM access_log ORDER BY seq"))
    token = (data_dir / "credentials" / "admin.token").read_text().strip()
    _rules(data_dir, token)
    checked = subprocess.run(
        [sys.executable, "-m", "phiaudit.receiver", "verify", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=_env(PHIAUDIT_TOKEN=token), check=False)
    print("\n== tamper evidence: phiaudit verify (hash chains, signed Merkle checkpoints, anchor)")
    print("   " + (checked.stdout.strip() or checked.stderr.strip()))
    print(f"\ndemo: data kept in {data_dir}; credential in "
          f"{data_dir / 'credentials' / 'admin.token'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
