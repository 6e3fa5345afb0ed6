"""A FHIR-style Flask service over SQLite (or PostgreSQL), audited by phiaudit without audit code.

Patient, Observation and Encounter under ``/fhir``, a login/logout pair, a ``$export``,
a notes route outside FHIR, and a disclosure endpoint. Instrumentation is only
``opentelemetry-instrumentation-flask``/``-sqlite3`` plus phiaudit; the application adds
just what they cannot see (the patients a search returned, a disclosure's recipient).

Run it (auditing to a phiaudit receiver on 127.0.0.1:4317)::

    PYTHONPATH=instrumentation python -m sample.app --port 8080

or, with zero code::

    PYTHONPATH=instrumentation PHIAUDIT_INSTRUMENTATION_CONFIG=... \\
    OTEL_PYTHON_DISTRO=phiaudit opentelemetry-instrument python -m sample.app --no-instrument

PostgreSQL mode: give a ``postgresql://`` URL instead of a SQLite file (``--db URL`` or the
``DATABASE_URL`` variable; ``create_app("postgresql://...")``). The database must hold the
schema and the data already (``seed_postgres(url)`` creates them: a DBA's step, not the
app's, so the app's own start-up touches no PHI table outside a request). Statements go
through psycopg 3, traced by ``opentelemetry-instrumentation-psycopg`` with sqlcommenter on:
each carries ``/*...traceparent='00-<trace>-<span>-01'*/``, which pgAudit logs with it, so
the database's own audit log joins the application's trace::

    PYTHONPATH=instrumentation DATABASE_URL=postgresql://ehr_app@127.0.0.1:5432/clinic \
        python -m sample.app --port 8080

All data is synthetic (``p-001``.. ``p-008``, users ``alice``/``bob``, password
``synthetic-pw``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sqlite3
import tempfile
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, jsonify, request
from opentelemetry import trace

from phiaudit.instrumentation import (
    ClassificationConfig,
    InstrumentationConfig,
    RouteRule,
    annotate,
    disclosure,
    identify,
)

PASSWORD = "synthetic-pw"  # noqa: S105 - synthetic demo credential
PATIENTS = [
    ("p-001", "Synthetic", "Ada", "1970-01-01"),
    ("p-002", "Synthetic", "Ben", "1981-02-02"),
    ("p-003", "Synthetic", "Cleo", "1992-03-03"),
    ("p-004", "Testcase", "Dan", "1963-04-04"),
    ("p-005", "Testcase", "Eve", "2001-05-05"),
    ("p-006", "Synthetic", "Finn", "1955-06-06"),
    ("p-007", "Testcase", "Gus", "1999-07-07"),
    ("p-008", "Synthetic", "Hana", "1988-08-08"),
]
USERS = [("alice", "clinician"), ("bob", "billing")]

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (id TEXT PRIMARY KEY, family TEXT, given TEXT, birth TEXT);
CREATE TABLE IF NOT EXISTS observations (id TEXT PRIMARY KEY, patient_id TEXT, code TEXT,
                                         value TEXT);
CREATE TABLE IF NOT EXISTS encounters (id TEXT PRIMARY KEY, patient_id TEXT, kind TEXT);
CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, patient_id TEXT, body TEXT);
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, pw_hash TEXT, role TEXT);
"""


def sample_config(*, audit_tables: bool = True) -> InstrumentationConfig:
    """The phiaudit configuration of this service: FHIR under /fhir (default), the notes
    route, and (``audit_tables``) the PHI tables, so SQL on them is audited too."""
    return InstrumentationConfig(
        classification=ClassificationConfig(
            routes=(
                RouteRule("/api/patients/<patient_id>/notes", "Note", patient_param="patient_id"),
            ),
            phi_tables=(
                {
                    "patients": "Patient",
                    "observations": "Observation",
                    "encounters": "Encounter",
                    "notes": "Note",
                }
                if audit_tables
                else {}
            ),
        )
    )


@dataclass(frozen=True)
class User:
    """The authenticated user (phiaudit's Flask resolver reads ``g.user``)."""

    username: str
    roles: tuple[str, ...]
    is_authenticated: bool = True


def _hash(password: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), b"sample-salt", 1000).hex()


def _seed(path: str) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        if db.execute("SELECT count(*) FROM patients").fetchone()[0]:
            return
        db.executemany("INSERT INTO patients VALUES (?, ?, ?, ?)", PATIENTS)
        for i, (pid, *_rest) in enumerate(PATIENTS, start=1):
            db.execute(
                "INSERT INTO observations VALUES (?, ?, ?, ?)",
                (f"o-{i:03d}", pid, "8867-4", str(60 + i)),
            )
            db.execute("INSERT INTO encounters VALUES (?, ?, ?)", (f"e-{i:03d}", pid, "AMB"))
            db.execute(
                "INSERT INTO notes (patient_id, body) VALUES (?, ?)", (pid, "synthetic note")
            )
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?)", [(u, _hash(PASSWORD), r) for u, r in USERS]
        )


#: the schema in PostgreSQL (``notes.id`` is generated there, as SQLite's INTEGER PRIMARY KEY)
PG_SCHEMA = SCHEMA.replace("notes (id INTEGER PRIMARY KEY", "notes (id SERIAL PRIMARY KEY")


def is_postgres(db: str | os.PathLike[str] | None) -> bool:
    """Whether ``db`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return str(db or "").startswith(("postgresql://", "postgres://"))


def seed_postgres(url: str, *, audit_off: bool = False) -> None:
    """Create the schema and the synthetic data in the PostgreSQL database ``url`` (if the
    patients table is empty). ``audit_off``: ``SET pgaudit.log = 'none'`` for this session
    first (superuser only), so that set-up is not mistaken for access to PHI."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if audit_off:
            conn.execute("SET pgaudit.log = 'none'")
        with conn.transaction():
            for stmt in filter(str.strip, PG_SCHEMA.split(";")):
                conn.execute(stmt)
            row = conn.execute("SELECT count(*) FROM patients").fetchone()
            if row and row[0]:
                return
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO patients VALUES (%s, %s, %s, %s)", PATIENTS)
                for i, (pid, *_rest) in enumerate(PATIENTS, start=1):
                    cur.execute(
                        "INSERT INTO observations VALUES (%s, %s, %s, %s)",
                        (f"o-{i:03d}", pid, "8867-4", str(60 + i)),
                    )
                    cur.execute(
                        "INSERT INTO encounters VALUES (%s, %s, %s)", (f"e-{i:03d}", pid, "AMB")
                    )
                    cur.execute(
                        "INSERT INTO notes (patient_id, body) VALUES (%s, %s)",
                        (pid, "synthetic note"),
                    )
                cur.executemany(
                    "INSERT INTO users VALUES (%s, %s, %s)",
                    [(u, _hash(PASSWORD), r) for u, r in USERS],
                )


def _patient(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": row[0],
        "name": [{"family": row[1], "given": [row[2]]}],
        "birthDate": row[3],
    }


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r} for r in resources],
    }


def create_app(
    db_path: str | os.PathLike[str] | None = None,
    *,
    instrument: bool = True,
    tracer_provider: trace.TracerProvider | None = None,
) -> Flask:
    """The Flask application. ``db_path``: SQLite file (created and seeded if needed; a
    temporary file by default), or a ``postgresql://`` URL (the database already seeded,
    see ``seed_postgres``). ``instrument``: apply the Flask and sqlite3 (or psycopg, with
    sqlcommenter) instrumentations here with ``tracer_provider`` (default: the global one);
    pass False when ``opentelemetry-instrument`` already does it."""
    postgres = is_postgres(db_path)
    path = str(db_path or os.path.join(tempfile.mkdtemp(prefix="phiaudit-sample-"), "clinic.db"))
    if not postgres:
        _seed(path)
    app = Flask("phiaudit_sample")
    tokens: dict[str, User] = {}
    if instrument:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor.instrument_app(app, tracer_provider=tracer_provider)

    def db() -> Any:
        if "db" not in g and postgres:
            import psycopg

            pconn = psycopg.connect(path)
            if instrument:
                from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

                # sqlcommenter: the statement carries the traceparent, pgAudit logs it
                pconn = PsycopgInstrumentor.instrument_connection(
                    pconn, tracer_provider, enable_commenter=True
                )
            g.db = pconn
        elif "db" not in g:
            conn = sqlite3.connect(path)
            if instrument:
                from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor

                conn = SQLite3Instrumentor.instrument_connection(conn, tracer_provider)
            g.db = conn
        return g.db

    def q(sql: str, params: tuple[Any, ...] = ()) -> Any:
        # a cursor: the sqlite3 instrumentation traces cursor.execute, not the
        # connection's execute shortcut
        cur = db().cursor()
        cur.execute(sql.replace("?", "%s") if postgres else sql, params)
        return cur

    @app.teardown_appcontext
    def _close(_exc: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    @app.before_request
    def _authenticate() -> Any:
        header = request.headers.get("Authorization", "")
        user = tokens.get(header.removeprefix("Bearer ").strip()) if header else None
        if user is not None:
            g.user = user
            identify(user.username, roles=user.roles)
        public = request.path in ("/login", "/healthz", "/fhir/metadata")
        if user is None and not public:
            return jsonify({"error": "unauthorized"}), 401
        return None

    @app.post("/login")
    def login() -> Any:
        body = request.get_json(silent=True) or {}
        name, password = str(body.get("username", "")), str(body.get("password", ""))
        identify(name)  # who tried, also when it fails
        row = q("SELECT pw_hash, role FROM users WHERE name = ?", (name,)).fetchone()
        if row is None or not secrets.compare_digest(row[0], _hash(password)):
            return jsonify({"error": "invalid credentials"}), 401
        token = secrets.token_urlsafe(16)
        tokens[token] = User(name, (row[1],))
        return jsonify({"token": token})

    @app.post("/logout")
    def logout() -> Any:
        tokens.pop(request.headers.get("Authorization", "").removeprefix("Bearer ").strip(), None)
        return jsonify({"ok": True})

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"ok": True})

    @app.get("/fhir/metadata")
    def metadata() -> Any:
        return jsonify({"resourceType": "CapabilityStatement", "fhirVersion": "4.3.0"})

    @app.get("/fhir/Patient/<pid>")
    def read_patient(pid: str) -> Any:
        row = q("SELECT * FROM patients WHERE id = ?", (pid,)).fetchone()
        return (jsonify(_patient(row)), 200) if row else (jsonify({"error": "not found"}), 404)

    @app.get("/fhir/Patient")
    def search_patients() -> Any:
        family = request.args.get("family", "")
        rows = q("SELECT * FROM patients WHERE family = ?", (family,)).fetchall()
        annotate(patients=[r[0] for r in rows], record_count=len(rows))
        return jsonify(_bundle([_patient(r) for r in rows]))

    @app.put("/fhir/Patient/<pid>")
    def update_patient(pid: str) -> Any:
        body = request.get_json(silent=True) or {}
        name = (body.get("name") or [{}])[0]
        cur = q(
            "UPDATE patients SET family = ?, given = ? WHERE id = ?",
            (name.get("family"), (name.get("given") or [""])[0], pid),
        )
        db().commit()
        return (jsonify({"id": pid}), 200) if cur.rowcount else (jsonify({}), 404)

    def _by_patient(table: str, rtype: str, fields: tuple[str, ...]) -> Any:
        pid = request.args.get("patient", "").removeprefix("Patient/")
        rows = q(f"SELECT * FROM {table} WHERE patient_id = ?", (pid,)).fetchall()
        annotate(record_count=len(rows))
        res = [{"resourceType": rtype, **dict(zip(fields, r, strict=False))} for r in rows]
        return jsonify(_bundle(res))

    @app.get("/fhir/Observation")
    def search_observations() -> Any:
        return _by_patient("observations", "Observation", ("id", "patient", "code", "value"))

    @app.get("/fhir/Encounter")
    def search_encounters() -> Any:
        return _by_patient("encounters", "Encounter", ("id", "patient", "class"))

    @app.post("/fhir/Observation")
    def create_observation() -> Any:
        body = request.get_json(silent=True) or {}
        oid = "o-" + secrets.token_hex(4)
        pid = str(body.get("subject", {}).get("reference", "")).removeprefix("Patient/")
        q(
            "INSERT INTO observations VALUES (?, ?, ?, ?)",
            (oid, pid, body.get("code", ""), str(body.get("value", ""))),
        )
        db().commit()
        annotate(patients=pid, resource_id=oid)
        return jsonify({"resourceType": "Observation", "id": oid}), 201

    @app.get("/fhir/Patient/$export")
    def export_patients() -> Any:
        rows = q("SELECT * FROM patients").fetchall()
        annotate(
            patients=[r[0] for r in rows],
            record_count=len(rows),
            recipient=request.args.get("recipient", "bulk-data-client"),
        )
        lines = "".join(f"{_json(_patient(r))}\n" for r in rows)
        return Response(lines, mimetype="application/fhir+ndjson")

    @app.get("/api/patients/<patient_id>/notes")
    def notes(patient_id: str) -> Any:
        rows = q("SELECT id, body FROM notes WHERE patient_id = ?", (patient_id,)).fetchall()
        annotate(record_count=len(rows))
        return jsonify([{"id": r[0], "body": r[1]} for r in rows])

    @app.post("/api/disclosures")
    def disclose() -> Any:
        body = request.get_json(silent=True) or {}
        pid, recipient = str(body.get("patient_id", "")), str(body.get("recipient", ""))
        with disclosure(
            recipient,
            patients=pid,
            resource_type="Encounter",
            purpose=str(body.get("purpose", "HPAYMT")),
        ) as audit:
            rows = q("SELECT * FROM encounters WHERE patient_id = ?", (pid,)).fetchall()
            audit.set_record_count(len(rows))
        return jsonify({"disclosed": len(rows)})

    return app


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


def main(argv: list[str] | None = None) -> None:
    """Serve the sample on ``--port``, auditing to ``--audit-endpoint``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--db",
        default=os.environ.get("DATABASE_URL"),
        help="SQLite file or postgresql:// URL (default: $DATABASE_URL, else a temporary file)",
    )
    parser.add_argument("--audit-endpoint", default="http://127.0.0.1:4317")
    parser.add_argument(
        "--no-instrument",
        action="store_true",
        help="opentelemetry-instrument already instrumented the process",
    )
    args = parser.parse_args(argv)
    if not args.no_instrument:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        from phiaudit.instrumentation import configure

        configure(
            OTLPSpanExporter(endpoint=args.audit_endpoint, insecure=True), config=sample_config()
        )
    create_app(args.db, instrument=not args.no_instrument).run(port=args.port)


if __name__ == "__main__":
    main()
