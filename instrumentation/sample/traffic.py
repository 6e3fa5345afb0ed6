"""Realistic, synthetic traffic against the sample service, with a summary of what was sent.

::

    from sample.app import create_app
    from sample.traffic import drive_traffic

    summary = drive_traffic(create_app().test_client())          # in process
    summary = drive_traffic("http://127.0.0.1:8080", rounds=3)   # over real HTTP

Each round: three failed logins, a clinician's login, reads, searches returning several
patients, an update, a create, a notes read, a disclosure to an insurer, a bulk
``$export``, an unauthorised read (401), non-PHI requests, and a logout.

The summary counts the audit events the requests should produce at the HTTP level, per
action and per outcome, and lists every patient id touched. Database spans on PHI tables
and the explicit disclosure span are audit events too: they are *additional* to these
counts (see ``TrafficSummary``). All ids and names are synthetic.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sample.app import PASSWORD, PATIENTS


@dataclass
class TrafficSummary:
    """What :func:`drive_traffic` sent.

    ``actions``: HTTP requests per expected ``phi.audit.action`` (login, logout, read,
    search, create, update, disclose, export); ``failures``: those expected to have outcome
    ``failure`` (failed logins, the unauthorised read), per action; ``patient_ids``: every
    patient touched; ``non_phi_requests``: requests that must not become audit events;
    ``statuses``: HTTP status codes seen. The disclosure request is counted once under
    ``disclose``: the app records it through an explicit ``disclosure()`` span (its HTTP
    span is not PHI).
    """

    actions: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    patient_ids: set[str] = field(default_factory=set)
    non_phi_requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def audit_events(self) -> int:
        """HTTP-level audit events expected (sum of ``actions``)."""
        return sum(self.actions.values())


class _Client:
    """The same calls over a Flask test client or real HTTP."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.token: str | None = None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if not isinstance(self._target, str):  # a Flask test client
            resp = self._target.open(path, method=method, json=body, headers=headers)
            return resp.status_code, resp.get_json(silent=True)
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(  # noqa: S310 - the caller's own service URL
            self._target.rstrip("/") + path,
            data=data,
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own URL
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None


def drive_traffic(target: Any, *, rounds: int = 1) -> TrafficSummary:
    """Send ``rounds`` rounds of traffic to ``target`` (a Flask test client, or the base
    URL of a running sample service) and return what was sent."""
    summary = TrafficSummary()
    client = _Client(target)
    all_ids = [p[0] for p in PATIENTS]
    synthetic = [p[0] for p in PATIENTS if p[1] == "Synthetic"]

    def call(
        method: str,
        path: str,
        body: Any = None,
        *,
        action: str | None,
        patients: tuple[str, ...] | list[str] = (),
        fails: bool = False,
    ) -> Any:
        status, payload = client.call(method, path, body)
        summary.statuses[status] += 1
        if action is None:
            summary.non_phi_requests += 1
        else:
            summary.actions[action] += 1
            if fails:
                summary.failures[action] += 1
            summary.patient_ids.update(patients)
        return payload

    for _ in range(rounds):
        client.token = None
        for _attempt in range(3):
            call(
                "POST",
                "/login",
                {"username": "mallory", "password": "guess"},
                action="login",
                fails=True,
            )
        call("GET", "/healthz", action=None)
        call("GET", "/fhir/metadata", action=None)
        call("GET", "/fhir/Patient/p-001", action="read", patients=["p-001"], fails=True)
        payload = call(
            "POST", "/login", {"username": "alice", "password": PASSWORD}, action="login"
        )
        client.token = payload["token"]
        call("GET", "/fhir/Patient/p-001", action="read", patients=["p-001"])
        call("GET", "/fhir/Patient/p-002", action="read", patients=["p-002"])
        call("GET", "/fhir/Patient?family=Synthetic", action="search", patients=synthetic)
        call("GET", "/fhir/Observation?patient=p-001", action="search", patients=["p-001"])
        call("GET", "/fhir/Encounter?patient=Patient/p-005", action="search", patients=["p-005"])
        call(
            "PUT",
            "/fhir/Patient/p-003",
            {"resourceType": "Patient", "name": [{"family": "Synthetic", "given": ["Cleo"]}]},
            action="update",
            patients=["p-003"],
        )
        call(
            "POST",
            "/fhir/Observation",
            {"subject": {"reference": "Patient/p-006"}, "code": "8867-4", "value": 72},
            action="create",
            patients=["p-006"],
        )
        call("GET", "/api/patients/p-002/notes", action="read", patients=["p-002"])
        call(
            "POST",
            "/api/disclosures",
            {"patient_id": "p-004", "recipient": "Synthetic Insurance Co", "purpose": "HPAYMT"},
            action="disclose",
            patients=["p-004"],
        )
        call("GET", "/fhir/Patient/$export", action="export", patients=all_ids)
        call("POST", "/logout", action="logout")
    return summary


if __name__ == "__main__":
    import sys

    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
    result = drive_traffic(url)
    print(
        dict(result.actions),
        "failures:",
        dict(result.failures),
        "patients:",
        len(result.patient_ids),
    )
