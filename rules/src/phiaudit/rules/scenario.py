"""A synthetic hospital, its normal audit traffic, and labelled anomalies for every built-in rule.

``generate(ScenarioConfig(...), index)`` builds, from one seed (``random.Random(seed)``):

* a population: patients (synthetic ids ``MRN...``), departments, practitioners with roles
  (physician, nurse, billing), their workstations and working schedules (by role, and a few
  user schedules that override their role's), in one time zone;
* encounters: time-bounded practitioner-patient relationships (several practitioners each),
  and the care relationships they imply (``care_relationships`` rows, patient ids as blind
  indexes); billing clerks get a ``billing`` relationship to the encounters they work on;
* normal traffic derived from them: logins at the start of each shift (now and then after one
  mistyped password) and logouts at its end, reads/searches/updates of the practitioner's own
  encounter patients during the shift, a few disclosures, daily claim exports below the
  threshold, the application's database reads (an audit event and a pgAudit record or a
  database client span sharing a trace id), infrastructure records that touch no PHI (network
  flows, console logins, reads of non-PHI tables and buckets), and audit-trail reads by the
  compliance team (all allowed);
* unless ``anomalies=False``, injected anomalies, each with a ``Label`` naming the rule that
  must catch it and the event ids that are its evidence: bulk access, large export, off-hours
  access (by role schedule and by user schedule), failed-login bursts per user and per source
  address, a success after a burst, access to patients without (or after) a care
  relationship, break-glass, database and cloud reads of PHI that bypass the application, and
  refused audit-trail reads.

The clean traffic is built so that no rule can fire on it by chance: a practitioner sees at
most ``bulk_threshold // 2`` distinct patients in the whole period, exports stay below a
third of the export threshold, every clinical access falls inside the actor's schedule and an
encounter of theirs, login failures are single typos from the user's own workstation, every
PHI-touching infrastructure record shares its trace id with an application audit event, and
no audit-trail read is refused.

``Scenario.write(store, encoder)`` stores everything through the real ``RecordEncoder`` and
``BatchWriter`` (encryption, blind indexes, hash chains). Imports only the standard library
and ``phiaudit.storage``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from hashlib import sha256
from typing import Any
from zoneinfo import ZoneInfo

from phiaudit.storage import (
    ACCESS_LOG_COLUMNS,
    AUDIT_COLUMNS,
    CARE_COLUMNS,
    INFRA_COLUMNS,
    AccessRecord,
    AuditEvent,
    BatchWriter,
    InfraEvent,
    RecordEncoder,
    TableSpec,
    canonical_encoder,
)

__all__ = [
    "HOSPITALIST_SCHEDULE",
    "OPEN_HOURS",
    "ROLE_SCHEDULES",
    "AccessEntry",
    "Encounter",
    "Label",
    "Practitioner",
    "Scenario",
    "ScenarioConfig",
    "Schedule",
    "generate",
]

_MIN = 60_000_000  # microseconds
_HOUR = 60 * _MIN
_DAY = 24 * _HOUR
_ALL_DAYS = (1, 2, 3, 4, 5, 6, 7)
_WEEKDAYS = (1, 2, 3, 4, 5)

#: The PHI catalog the infrastructure records were matched against (service config ``infra:``).
PHI_TABLES = ("public.patients", "public.observations", "clinical.*")
PHI_BUCKETS = ("phi-exports",)
_PHI_TABLE_CHOICES = (
    ("public.patients", "public.patients"),
    ("public.observations", "public.observations"),
    ("clinical.encounters", "clinical.*"),
    ("clinical.notes", "clinical.*"),
)
_PLAIN_TABLES = ("public.formulary", "public.departments", "public.schedules")


@dataclass(frozen=True)
class Schedule:
    """Working hours in local time: ISO ``days`` (1 = Monday) and whole hours ``start`` to
    ``end`` (end after start: no shift here crosses midnight)."""

    days: tuple[int, ...]
    start: int
    end: int

    def covers(self, local: datetime) -> bool:
        return local.isoweekday() in self.days and self.start <= local.hour < self.end

    def as_config(self) -> dict[str, Any]:
        """The schedule as the off-hours rule's settings spell it."""
        return {"days": list(self.days), "hours": [self.start, self.end]}


#: Each role's working schedule (the off-hours rule's role schedules).
ROLE_SCHEDULES: dict[str, Schedule] = {
    "physician": Schedule(_ALL_DAYS, 7, 19),
    "nurse": Schedule(_ALL_DAYS, 6, 20),
    "billing": Schedule(_WEEKDAYS, 8, 17),
}
#: The hospitalists' schedule (a user schedule that overrides the physician role's).
HOSPITALIST_SCHEDULE = Schedule(_ALL_DAYS, 12, 23)
#: When the hospital's applications are in use at all: the default for actors without a role
#: or user schedule (failed logins, whose roles are unknown).
OPEN_HOURS = Schedule(_ALL_DAYS, 6, 23)


@dataclass(frozen=True)
class Practitioner:
    actor_id: str
    role: str
    department: str
    workstation: str
    schedule: Schedule
    #: True when ``schedule`` is the user's own (configured per user), not the role's
    user_schedule: bool = False


@dataclass(frozen=True)
class Encounter:
    encounter_id: str
    patient_id: str
    department: str
    start_us: int
    end_us: int
    practitioners: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Encounter({self.encounter_id}, {self.department}, phi=[REDACTED])"


@dataclass(frozen=True)
class Label:
    """An injected anomaly: ``rule_id`` must raise an alert whose evidence holds at least one
    of ``event_ids`` (rows of ``table``). ``case`` describes it; never PHI."""

    rule_id: str
    case: str
    table: str
    event_ids: frozenset[uuid.UUID]


@dataclass
class AccessEntry:
    """One audit-trail read (``access_log``), with its id and time fixed by the scenario."""

    event_id: uuid.UUID
    time_us: int
    record: AccessRecord


@dataclass
class ScenarioConfig:
    seed: int = 5
    start: date = date(2026, 11, 16)  # a Monday
    days: int = 2
    patients: int = 300
    departments: tuple[str, ...] = ("emergency", "medicine", "surgery", "pediatrics",
                                    "cardiology")
    physicians_per_department: int = 4
    nurses_per_department: int = 6
    billing_clerks: int = 3
    timezone: str = "America/New_York"
    #: the rules' thresholds the scenario is built around (clean traffic stays well below,
    #: anomalies well above)
    bulk_threshold: int = 40          # distinct patients per actor per window
    export_threshold: int = 1000      # record_count of one export or disclosure
    failed_login_threshold: int = 5   # failed logins per user / per source in a window
    anomalies: bool = True

    def __post_init__(self) -> None:
        if self.days < 2:
            raise ValueError("days: at least 2 (the anomalies use two days)")
        if self.patients < self.bulk_threshold * 2 + 20:
            raise ValueError("patients: at least twice the bulk threshold plus 20")
        if self.physicians_per_department < 2 or self.nurses_per_department < 1:
            raise ValueError("staff: at least 2 physicians and 1 nurse per department")
        if self.billing_clerks < 2 or not self.departments:
            raise ValueError("staff: at least 2 billing clerks and one department")


@dataclass
class Scenario:
    config: ScenarioConfig
    start_us: int
    end_us: int
    timezone: str
    patients: list[str]
    practitioners: list[Practitioner]
    encounters: list[Encounter]
    audit: list[AuditEvent] = field(default_factory=list)
    infra: list[InfraEvent] = field(default_factory=list)
    access: list[AccessEntry] = field(default_factory=list)
    #: ``care_relationships`` rows (CARE_COLUMNS order), patient ids as blind indexes
    care: list[list[Any]] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)

    def __repr__(self) -> str:  # never print the population (synthetic, but patient ids)
        return (f"Scenario(seed={self.config.seed}, days={self.config.days}, "
                f"{self.counts()}, phi=[REDACTED])")

    def user_schedules(self) -> dict[str, Schedule]:
        return {p.actor_id: p.schedule for p in self.practitioners if p.user_schedule}

    def schedule_config(self) -> dict[str, Any]:
        """The hospital's schedules as a user writes them in the off-hours rule's settings
        (``rules.settings.off-hours.schedule``): open hours by default, each role's and each
        user's own."""
        return {"timezone": self.timezone, **OPEN_HOURS.as_config(),
                "roles": {r: s.as_config() for r, s in ROLE_SCHEDULES.items()},
                "users": {u: s.as_config() for u, s in self.user_schedules().items()}}

    def labelled(self, rule_id: str) -> list[Label]:
        return [lab for lab in self.labels if lab.rule_id == rule_id]

    def counts(self) -> dict[str, int]:
        return {"audit_events": len(self.audit), "infra_events": len(self.infra),
                "access_log": len(self.access), "care_relationships": len(self.care),
                "labels": len(self.labels)}

    def rows(self, encoder: RecordEncoder) -> dict[str, list[list[Any]]]:
        """Every row, encrypted and indexed, in table column order (chain columns empty)."""
        leaf = canonical_encoder(ACCESS_LOG_COLUMNS)
        access = []
        for entry in self.access:
            row = encoder.access_row(entry.record, entry.time_us)
            row[0] = entry.event_id  # the scenario's id (its labels name it), bound again below
            row[5] = encoder.cipher.encrypt("statement", entry.event_id.bytes,
                                            entry.record.statement)
            row[-1] = sha256(leaf(row)).digest()
            access.append(row)
        return {
            "audit_events": [encoder.audit_row(ev) for ev in self.audit],
            "infra_events": [encoder.infra_row(ev) for ev in self.infra],
            "access_log": access,
            "care_relationships": [list(r) for r in self.care],
        }

    def write(self, store: Any, encoder: RecordEncoder, *, writer_id: str = "scenario",
              chunk: int = 5000, timeout: float = 300.0) -> dict[str, int]:
        """Write the scenario through a ``BatchWriter`` (chained tables hash-linked) and wait
        until it is committed. Returns the rows written per table."""
        tables = self.rows(encoder)
        writer = BatchWriter(store, writer_id, [
            TableSpec("audit_events", AUDIT_COLUMNS, chained=True, dedup_column="event_id"),
            TableSpec("infra_events", INFRA_COLUMNS, chained=True, dedup_column="event_id"),
            TableSpec("access_log", ACCESS_LOG_COLUMNS, chained=True),
            TableSpec("care_relationships", CARE_COLUMNS, chained=False),
        ], max_rows=chunk)
        writer.start()
        try:
            futures = []
            for name, rows in tables.items():
                for i in range(0, len(rows), chunk):
                    # a key of its own per chunk: the writer derives the insert deduplication
                    # token of unchained tables from the request keys
                    key = f"{writer_id}:{name}:{i}".encode()
                    futures.append(writer.submit(key, {name: rows[i:i + chunk]}))
            for fut in futures:
                fut.result(timeout=timeout)
        finally:
            writer.shutdown()
        return {name: len(rows) for name, rows in tables.items()}


# ---------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, cfg: ScenarioConfig, index: Callable[[str, str], str]) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)  # noqa: S311 - a reproducible simulation
        self.index = index
        self.tz = ZoneInfo(cfg.timezone)
        self.start_us = self.local_us(0, 0, 0)
        self.end_us = self.local_us(cfg.days, 0, 0)
        self.audit: list[AuditEvent] = []
        self.infra: list[InfraEvent] = []
        self.access: list[AccessEntry] = []
        self.care: list[list[Any]] = []
        self.labels: list[Label] = []
        self.encounters: list[Encounter] = []
        self.practitioners: list[Practitioner] = []
        self.by_id: dict[str, Practitioner] = {}
        #: distinct patients each practitioner has a relationship with (the bulk guard)
        self.load: dict[str, set[str]] = {}
        #: (actor, patient) -> care periods
        self.periods: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.loaded_us = self.start_us - 3 * _DAY
        self.app_address = "10.0.5.10"
        self.patients: list[str] = []

    # -- time ------------------------------------------------------------------------------

    def local_us(self, day: int, hour: int, minute: int, second: int = 0) -> int:
        d = self.cfg.start + timedelta(days=day)
        local = datetime(d.year, d.month, d.day, hour, minute, second, tzinfo=self.tz)
        return int(local.timestamp()) * 1_000_000

    def shift(self, p: Practitioner, day: int) -> tuple[int, int] | None:
        """The UTC interval of ``p``'s shift on local day ``day``, or None if off that day."""
        weekday = (self.cfg.start + timedelta(days=day)).isoweekday()
        if weekday not in p.schedule.days:
            return None
        return self.local_us(day, p.schedule.start, 0), self.local_us(day, p.schedule.end, 0)

    def working(self, p: Practitioner, t_us: int) -> bool:
        local = datetime.fromtimestamp(t_us / 1_000_000, self.tz)
        return p.schedule.covers(local)

    def uid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def hexid(self, nbytes: int) -> str:
        return self.rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex()

    # -- population -----------------------------------------------------------------------

    def population(self) -> list[str]:
        cfg, rng = self.cfg, self.rng
        numbers = rng.sample(range(1_000_000, 9_999_999), cfg.patients)
        patients = [f"MRN{n}" for n in numbers]
        serial = 0
        for d_i, dept in enumerate(cfg.departments):
            for role, count in (("physician", cfg.physicians_per_department),
                                ("nurse", cfg.nurses_per_department)):
                for k in range(count):
                    serial += 1
                    prefix = "dr" if role == "physician" else "rn"
                    hospitalist = role == "physician" and dept == cfg.departments[0] and k == 0
                    sched = HOSPITALIST_SCHEDULE if hospitalist else ROLE_SCHEDULES[role]
                    self.add_staff(Practitioner(
                        f"{prefix}{serial:04d}", role, dept, f"10.20.{d_i + 1}.{k + 10}"
                        if role == "physician" else f"10.20.{d_i + 1}.{k + 100}",
                        sched, user_schedule=hospitalist))
        for k in range(cfg.billing_clerks):
            serial += 1
            self.add_staff(Practitioner(f"bl{serial:04d}", "billing", "billing",
                                        f"10.30.1.{k + 10}", ROLE_SCHEDULES["billing"]))
        return patients

    def add_staff(self, p: Practitioner) -> None:
        self.practitioners.append(p)
        self.by_id[p.actor_id] = p
        self.load[p.actor_id] = set()

    def staff(self, role: str, dept: str | None = None) -> list[Practitioner]:
        return [p for p in self.practitioners
                if p.role == role and (dept is None or p.department == dept)]

    @property
    def cap(self) -> int:
        return max(2, self.cfg.bulk_threshold // 2)

    def pick(self, role: str, dept: str, n: int, patient: str) -> list[Practitioner]:
        pool = [p for p in self.staff(role, dept) if len(self.load[p.actor_id]) < self.cap]
        self.rng.shuffle(pool)
        pool.sort(key=lambda p: len(self.load[p.actor_id]))
        return pool[:n]

    def relate(self, actor: str, patient: str, start: int, end: int, kind: str) -> None:
        self.load[actor].add(patient)
        self.periods.setdefault((actor, patient), []).append((start, end))
        self.care.append([actor, self.index("patient", patient), start, end, kind,
                          "scenario-care-1", self.loaded_us, "scenario"])

    def covered(self, actor: str, patient: str, t_us: int) -> bool:
        return any(s <= t_us <= e for s, e in self.periods.get((actor, patient), ()))

    def encounter(self, patient: str, dept: str, start: int, end: int,
                  staff: list[Practitioner]) -> Encounter:
        enc = Encounter(f"enc-{len(self.encounters) + 1:06d}", patient, dept, start, end,
                        tuple(p.actor_id for p in staff))
        self.encounters.append(enc)
        for p in staff:
            self.relate(p.actor_id, patient, start, end, "encounter")
        return enc

    def encounters_for(self, patients: list[str]) -> None:
        cfg, rng = self.cfg, self.rng
        for patient in patients:
            n = rng.choices((0, 1, 2), weights=(12, 73, 15))[0]
            for _ in range(n):
                dept = rng.choice(cfg.departments)
                if dept == cfg.departments[0]:  # emergency: hours
                    length = rng.randint(2 * _HOUR, 10 * _HOUR)
                else:  # inpatient: days
                    length = rng.randint(_DAY, 4 * _DAY)
                start = rng.randint(self.start_us - _DAY, self.end_us - 3 * _HOUR)
                team = (self.pick("physician", dept, 2 if rng.random() < 0.3 else 1, patient)
                        + self.pick("nurse", dept, rng.randint(1, 2), patient))
                if team:
                    self.encounter(patient, dept, start, start + length, team)

    # -- events ---------------------------------------------------------------------------

    def event(self, t_us: int, p: Practitioner | None, action: str, *, outcome: str = "success",
              patient: str = "", resource_type: str = "", record_count: int = 0,
              actor_id: str = "", client: str = "", purpose: str = "", recipient: str = "",
              roles: list[str] | None = None, db: bool = False) -> AuditEvent:
        rng = self.rng
        trace = self.hexid(16)
        route = {"login": "/auth/login", "logout": "/auth/logout", "export": "/exports",
                 "disclose": "/disclosures", "search": f"/fhir/{resource_type}",
                 "break_glass": "/emergency-access"}.get(action, f"/fhir/{resource_type}/{{id}}")
        method = {"read": "GET", "search": "GET", "update": "PUT"}.get(action, "POST")
        ev = AuditEvent(
            event_id=self.uid(), event_time_us=t_us,
            received_time_us=t_us + rng.randint(20_000, 900_000), action=action,
            outcome=outcome, outcome_reason="explicit" if outcome == "failure" else "",
            actor_id=actor_id or (p.actor_id if p else ""), actor_type="user",
            actor_roles=roles if roles is not None else ([p.role] if p else []),
            service_name="ehr-api", host_name=f"ehr-{rng.randint(1, 3)}",
            resource_type=resource_type,
            resource_id=f"{resource_type.lower()}-{rng.randint(1, 10**8)}" if patient else "",
            patient_id=patient, record_count=record_count or (1 if patient else 0),
            purpose=purpose or ("" if not (patient or record_count) or p is None else
                                "HPAYMT" if p.role == "billing" else "TREAT"),
            recipient=recipient,
            client_address=client or (p.workstation if p else ""),
            user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64) EHRClient/7.4",
            http_method=method, http_route=route,
            http_status=200 if outcome == "success" else 401,
            trace_id=trace, span_id=self.hexid(8), sender="ehr-api",
        )
        self.audit.append(ev)
        if db and outcome == "success":
            self.app_db(ev)
        return ev

    def app_db(self, ev: AuditEvent) -> None:
        """The application's own database read behind an audit event: same trace id."""
        rng = self.rng
        table, entry = rng.choice(_PHI_TABLE_CHOICES)
        verb = "UPDATE" if ev.action == "update" else "SELECT"
        t = ev.event_time_us + rng.randint(1_000, 40_000)
        if rng.random() < 0.7:
            self.pg(t, "ehr_app", self.app_address, verb, table, entry, ev.trace_id,
                    ev.span_id, rows=1)
        else:
            self.infra.append(InfraEvent(
                event_id=self.uid(), event_time_us=t, received_time_us=t + 300_000,
                source_kind="db_span", source="ehr-api", actor_id="ehr-api",
                client_address=self.app_address, operation=verb, object_type="table",
                object=table, phi_touch=True, phi_object=entry, outcome="success",
                record_count=1, trace_id=ev.trace_id, span_id=self.hexid(8),
                sender="ehr-api", raw=f"{verb} FROM {table} WHERE id = $1"))

    def pg(self, t: int, role: str, client: str, verb: str, table: str, entry: str,
           trace: str, span: str, *, rows: int) -> InfraEvent:
        comment = f" /*traceparent='00-{trace}-{span}-01'*/" if trace else ""
        raw = (f"AUDIT: SESSION,{self.rng.randint(1, 10**6)},1,READ,{verb},TABLE,{table},"
               f"{verb} * FROM {table} WHERE id = $1{comment},<not logged>")
        ev = InfraEvent(
            event_id=self.uid(), event_time_us=t, received_time_us=t + 1_500_000,
            source_kind="pgaudit", source="pg-ehr-1", actor_id=role, client_address=client,
            operation=verb, object_type="table", object=table,
            phi_touch=entry != "", phi_object=entry, outcome="success", record_count=rows,
            trace_id=trace, span_id=span if trace else "", sender="otel-collector", raw=raw)
        self.infra.append(ev)
        return ev

    def times(self, lo: int, hi: int, k: int) -> list[int]:
        return sorted(self.rng.randint(lo, hi) for _ in range(k))

    # -- normal traffic -------------------------------------------------------------------

    def clinical_traffic(self) -> None:
        rng = self.rng
        margin = 10 * _MIN
        for enc in self.encounters:
            for actor in enc.practitioners:
                p = self.by_id[actor]
                for day in range(self.cfg.days):
                    sh = self.shift(p, day)
                    if sh is None:
                        continue
                    lo = max(sh[0] + margin, enc.start_us + _MIN, self.start_us)
                    hi = min(sh[1] - margin, enc.end_us - _MIN, self.end_us)
                    if hi - lo < 5 * _MIN:
                        continue
                    for t in self.times(lo, hi, rng.randint(1, 4)):
                        self.clinical_access(p, enc.patient_id, t)

    def clinical_access(self, p: Practitioner, patient: str, t: int) -> None:
        rng = self.rng
        if p.role == "physician":
            action = rng.choices(("read", "search", "update", "disclose"),
                                 weights=(60, 15, 20, 5))[0]
        else:
            action = rng.choices(("read", "search", "update"), weights=(60, 5, 35))[0]
        rtype = rng.choice(("Patient", "Observation", "MedicationRequest", "Encounter",
                            "DiagnosticReport", "Condition"))
        if action == "disclose":
            self.event(t, p, action, patient=patient, resource_type="DocumentReference",
                       record_count=1, recipient="referral-clinic")
        else:
            self.event(t, p, action, patient=patient, resource_type=rtype,
                       db=rng.random() < 0.4)

    def billing_traffic(self) -> None:
        rng, cfg = self.rng, self.cfg
        clerks = self.staff("billing")
        for enc in self.encounters:
            if rng.random() > 0.35:
                continue
            pool = sorted(clerks, key=lambda c: len(self.load[c.actor_id]))
            clerk = pool[0]
            if len(self.load[clerk.actor_id]) >= self.cap:
                continue
            until = enc.end_us + 30 * _DAY
            self.relate(clerk.actor_id, enc.patient_id, enc.start_us, until, "billing")
            slots = []
            for day in range(cfg.days):
                sh = self.shift(clerk, day)
                if sh is None:
                    continue
                lo = max(sh[0] + 10 * _MIN, enc.start_us + _MIN)
                hi = min(sh[1] - 10 * _MIN, until)
                if hi - lo >= 5 * _MIN:
                    slots.append((lo, hi))
            if slots:
                lo, hi = rng.choice(slots)
                for t in self.times(lo, hi, rng.randint(1, 3)):
                    self.event(t, clerk, rng.choice(("read", "search")), patient=enc.patient_id,
                               resource_type=rng.choice(("Account", "Claim", "Coverage")),
                               db=rng.random() < 0.4)
        for clerk in clerks:
            for day in range(cfg.days):
                sh = self.shift(clerk, day)
                if sh is None:
                    continue
                t = rng.randint(sh[0] + 60 * _MIN, sh[1] - 60 * _MIN)
                self.event(t, clerk, "export", resource_type="Claim",
                           record_count=rng.randint(20, max(21, cfg.export_threshold // 3)),
                           recipient="clearinghouse")

    def sessions(self) -> None:
        """A login at the start of each shift (sometimes after one typo), a logout at its end."""
        rng = self.rng
        for p in self.practitioners:
            for day in range(self.cfg.days):
                sh = self.shift(p, day)
                if sh is None:
                    continue
                t = sh[0] + rng.randint(_MIN, 9 * _MIN)
                if rng.random() < 0.08:
                    self.event(t - rng.randint(5_000_000, 40_000_000), p, "login",
                               outcome="failure", roles=[])
                self.event(t, p, "login")
                self.event(sh[1] - rng.randint(_MIN, 9 * _MIN), p, "logout")

    def infra_background(self) -> None:
        """Infrastructure records that touch no PHI: they must never raise app-bypass."""
        rng = self.rng
        t = last_typo = self.start_us
        while t < self.end_us:
            t += rng.randint(2 * _MIN, 12 * _MIN)
            kind = rng.choice(("pg", "flow", "cloud", "console"))
            if kind == "pg":
                table = rng.choice(_PLAIN_TABLES)
                self.pg(t, rng.choice(("ehr_app", "reporting")), self.app_address, "SELECT",
                        table, "", "", "", rows=rng.randint(1, 500))
                continue
            if kind == "flow":
                src = f"10.20.{rng.randint(1, 5)}.{rng.randint(10, 120)}"
                raw = (f"2 123456789012 eni-0a1b2c3d {src} 10.0.5.10 {rng.randint(30000, 60000)}"
                       f" 443 6 {rng.randint(1, 50)} {rng.randint(100, 90000)} "
                       f"{t // 1_000_000} {t // 1_000_000 + 60} ACCEPT OK")
                ev = InfraEvent(self.uid(), t, t + 60_000_000, "vpcflow", source="vpc-flow",
                                client_address=src, operation="ACCEPT", object_type="endpoint",
                                object="10.0.5.10:443", outcome="success", raw=raw)
            elif kind == "cloud":
                key = f"static-assets/img/{rng.randint(1, 999)}.png"
                ev = InfraEvent(self.uid(), t, t + 300_000_000, "cloudtrail", source="cloudtrail",
                                actor_id="arn:aws:iam::123456789012:role/web", client_address=
                                "10.0.7.12", operation="GetObject", object_type="object",
                                object=key, outcome="success", record_count=1,
                                raw='{"eventVersion":"1.09","eventSource":"s3.amazonaws.com",'
                                    '"eventName":"GetObject"}')
            else:  # an operator signs in to the cloud console, mistyping at most once an hour
                typo = rng.random() < 0.1 and t - last_typo > _HOUR
                last_typo = t if typo else last_typo
                self.console_login(t, "arn:aws:iam::123456789012:user/ops", "10.0.8.20",
                                   "failure" if typo else "success")
                continue
            self.infra.append(ev)

    def console_login(self, t: int, actor: str, client: str, outcome: str) -> InfraEvent:
        ev = InfraEvent(self.uid(), t, t + 300_000_000, "cloudtrail", source="cloudtrail",
                        actor_id=actor, client_address=client, operation="ConsoleLogin",
                        object_type="login", object="signin.aws.amazon.com", outcome=outcome,
                        raw='{"eventVersion":"1.09","eventSource":"signin.amazonaws.com",'
                            '"eventName":"ConsoleLogin","responseElements":{"ConsoleLogin":"'
                            + ("Failure" if outcome == "failure" else "Success") + '"}}')
        self.infra.append(ev)
        return ev

    def trail_reads(self) -> None:
        """The compliance team reads the audit trail (allowed); one mistyped query errors."""
        rng = self.rng
        for day in range(self.cfg.days):
            for _ in range(rng.randint(2, 5)):
                t = self.local_us(day, rng.randint(9, 16), rng.randint(0, 59))
                self.access.append(AccessEntry(self.uid(), t, AccessRecord(
                    "compliance-1", "compliance", "service",
                    "SELECT action, count() FROM audit_events GROUP BY action", False,
                    rng.randint(1, 12), "ok")))
        t = self.local_us(0, 15, 7)
        self.access.append(AccessEntry(self.uid(), t, AccessRecord(
            "compliance-1", "compliance", "service", "SELEC count() FROM audit_events", False,
            0, "error", "PermanentError")))

    # -- anomalies ------------------------------------------------------------------------

    def label(self, rule_id: str, case: str, events: Iterable[Any],
              table: str = "audit_events") -> None:
        self.labels.append(Label(rule_id, case, table,
                                 frozenset(ev.event_id for ev in events)))

    def working_time(self, p: Practitioner, day: int, hour: int, minute: int) -> int:
        t = self.local_us(day, hour, minute)
        assert self.working(p, t), "anomaly time must be inside the actor's schedule"
        return t

    def anomalies(self, orphans: list[str]) -> None:
        cfg, rng = self.cfg, self.rng
        depts = cfg.departments
        nurses = [p for p in self.staff("nurse") if p.department == depts[1]]
        physicians = [p for p in self.staff("physician") if not p.user_schedule]
        clerks = self.staff("billing")
        hospitalist = next(p for p in self.practitioners if p.user_schedule)

        # bulk access: a nurse opens many patients she has no relationship with, in 25 minutes
        snoop = nurses[0]
        t0 = self.working_time(snoop, 0, 14, 0)
        targets = [pt for pt in self.patients if not any(
            self.covered(snoop.actor_id, pt, t0 + k * _MIN) for k in range(26))]
        n = min(len(targets), max(cfg.bulk_threshold * 2, cfg.bulk_threshold + 15))
        bulk = [self.event(t, snoop, rng.choice(("read", "read", "search")), patient=pt,
                           resource_type="Patient")
                for t, pt in zip(self.times(t0, t0 + 25 * _MIN, n),
                                 rng.sample(targets, n), strict=True)]
        self.label("bulk-access", "a nurse opens many patients in 25 minutes", bulk)
        self.label("no-care-relationship", "the bulk-accessed patients are not hers", bulk)

        # large export: a billing clerk exports far more claims than usual
        clerk = clerks[0]
        ev = self.event(self.working_time(clerk, 0, 11, 5), clerk, "export",
                        resource_type="Claim", record_count=cfg.export_threshold * 5,
                        recipient="unknown-vendor")
        self.label("large-export", "an export of five times the threshold", [ev])

        # off-hours, role schedule: a physician reads his own inpatient at 02:40
        doc = physicians[1]
        patient = orphans.pop()
        self.encounter(patient, doc.department, self.local_us(0, 8, 0),
                       self.local_us(1, 18, 0), [doc])
        night = self.local_us(1, 2, 40)
        assert not self.working(doc, night)
        ev = self.event(night, doc, "read", patient=patient, resource_type="Observation")
        self.label("off-hours", "a physician reads his own inpatient at 02:40", [ev])

        # off-hours, user schedule: the hospitalist (12:00-23:30) reads at 08:30, a time inside
        # the physician role's schedule but outside his own
        patient = orphans.pop()
        self.encounter(patient, hospitalist.department, self.local_us(0, 6, 0),
                       self.local_us(0, 22, 0), [hospitalist])
        early = self.local_us(0, 8, 30)
        assert not self.working(hospitalist, early)
        ev = self.event(early, hospitalist, "read", patient=patient, resource_type="Patient")
        self.label("off-hours", "the hospitalist reads before his own shift", [ev])

        # failed logins, per user: eight guesses at one account from eight addresses
        victim = physicians[2]
        t0 = self.working_time(victim, 0, 10, 0)
        guesses = [self.event(t, None, "login", outcome="failure", actor_id=victim.actor_id,
                              client=f"203.0.113.{20 + i}", roles=[])
                   for i, t in enumerate(self.times(t0, t0 + 3 * _MIN, 8))]
        self.label("failed-auth-user", "eight failed logins for one user", guesses)

        # failed logins, per source: one address tries twelve accounts once each
        t0 = self.local_us(0, 13, 0)
        sprayed = rng.sample(self.practitioners, 12)
        spray = [self.event(t, None, "login", outcome="failure", actor_id=p.actor_id,
                            client="198.51.100.77", roles=[])
                 for t, p in zip(self.times(t0, t0 + 4 * _MIN, 12), sprayed, strict=True)]
        self.label("failed-auth-source", "password spraying from one address", spray)

        # success after failures: seven failures then a success, one account, one address
        target = nurses[1]
        t0 = self.working_time(target, 1, 15, 30)
        burst = [self.event(t, None, "login", outcome="failure", actor_id=target.actor_id,
                            client="198.51.100.23", roles=[])
                 for t in self.times(t0, t0 + 2 * _MIN, 7)]
        ok = self.event(t0 + 3 * _MIN, target, "login", client="198.51.100.23")
        self.label("success-after-failures", "a success after seven failures", [*burst, ok])
        self.label("failed-auth-user", "the seven failures before the success", burst)
        self.label("failed-auth-source", "the seven failures from one address", burst)

        # no care relationship: a physician reads and updates a patient never under his care
        doc = physicians[3]
        patient = orphans.pop()
        t0 = self.working_time(doc, 1, 11, 0)
        evs = [self.event(t0, doc, "read", patient=patient, resource_type="Patient"),
               self.event(t0 + 4 * _MIN, doc, "update", patient=patient,
                          resource_type="Condition")]
        self.label("no-care-relationship", "a patient never under the actor's care", evs)

        # no care relationship any more: a read six hours after the encounter ended
        done = next(e for e in self.encounters
                    if self.start_us + 2 * _HOUR < e.end_us < self.end_us - 12 * _HOUR
                    and any(self.by_id[a].role == "physician" and not self.by_id[a].user_schedule
                            for a in e.practitioners))
        doc = next(self.by_id[a] for a in done.practitioners
                   if self.by_id[a].role == "physician" and not self.by_id[a].user_schedule)
        t = self.next_working(doc, done.end_us + 6 * _HOUR)
        if t is not None and not self.covered(doc.actor_id, done.patient_id, t):
            ev = self.event(t, doc, "read", patient=done.patient_id, resource_type="Patient")
            self.label("no-care-relationship", "a read after the encounter ended", [ev])

        # break-glass: an emergency physician breaks the glass for an unknown patient
        ed = next(p for p in physicians if p.department == depts[0])
        ev = self.event(self.working_time(ed, 1, 9, 15), ed, "break_glass",
                        patient=orphans.pop(), resource_type="Patient", purpose="ETREAT")
        self.label("break-glass", "an emergency access", [ev])

        # app bypass: direct database reads of PHI tables and a cloud read of a PHI object
        t = self.local_us(0, 16, 20)
        ev_i = self.pg(t, "dba_admin", "10.0.9.15", "SELECT", "public.patients",
                       "public.patients", "", "", rows=48_000)
        self.label("app-bypass", "a direct SELECT of a PHI table, no trace", [ev_i],
                   "infra_events")
        t = self.local_us(1, 13, 10)
        ev_i = self.pg(t, "ehr_app", self.app_address, "SELECT", "clinical.notes", "clinical.*",
                       self.hexid(16), self.hexid(8), rows=2_000)
        self.label("app-bypass", "a PHI table read in a trace without audit event", [ev_i],
                   "infra_events")
        t = self.local_us(1, 20, 45)
        key = "phi-exports/2026/11/claims-full.csv"
        ev_i = InfraEvent(self.uid(), t, t + 300_000_000, "cloudtrail", source="cloudtrail",
                          actor_id="arn:aws:iam::123456789012:user/contractor",
                          client_address="192.0.2.44", operation="GetObject",
                          object_type="object", object=key, phi_touch=True,
                          phi_object="phi-exports", outcome="success", record_count=1,
                          raw='{"eventVersion":"1.09","eventSource":"s3.amazonaws.com",'
                              '"eventName":"GetObject"}')
        self.infra.append(ev_i)
        self.label("app-bypass", "a cloud read of a PHI object outside the application",
                   [ev_i], "infra_events")

        # failed cloud console logins: someone guesses an administrator's password
        t0 = self.local_us(1, 3, 15)
        guesses_i = [self.console_login(t, "arn:aws:iam::123456789012:user/admin",
                                        "192.0.2.80", "failure")
                     for t in self.times(t0, t0 + 6 * _MIN, 9)]
        self.label("failed-auth-cloud", "nine failed console logins for one IAM user",
                   guesses_i, "infra_events")

        # refused audit-trail reads: an unauthenticated caller and a billing user try
        t0 = self.local_us(1, 10, 12)
        refused = [
            AccessEntry(self.uid(), t0, AccessRecord(
                "(unauthenticated)", "", "service", "SELECT * FROM audit_events", True, 0,
                "denied", "invalid credentials")),
            AccessEntry(self.uid(), t0 + 40_000_000, AccessRecord(
                "(unauthenticated)", "", "service", "SELECT * FROM access_log", True, 0,
                "denied", "invalid credentials")),
            AccessEntry(self.uid(), t0 + 95_000_000, AccessRecord(
                "billing-export", "billing", "direct", "SELECT * FROM audit_events", True, 0,
                "denied", "this role may not read the audit trail")),
        ]
        self.access.extend(refused)
        self.label("audit-read-refused", "three refused reads of the audit trail", refused,
                   "access_log")

    def next_working(self, p: Practitioner, t_us: int) -> int | None:
        """The first time at or after ``t_us`` (15-minute steps) inside ``p``'s schedule,
        30 minutes clear of its ends, within the period."""
        t = t_us
        while t < self.end_us - _HOUR:
            if self.working(p, t - 30 * _MIN) and self.working(p, t + 30 * _MIN):
                return t
            t += 15 * _MIN
        return None

    # -- all ------------------------------------------------------------------------------

    def build(self) -> Scenario:
        self.patients = self.population()
        n_orphans = 8
        orphans = self.patients[-n_orphans:]
        self.encounters_for(self.patients[:-n_orphans])
        if self.cfg.anomalies:
            # dedicated encounters of the off-hours cases exist before the traffic is derived
            self.anomalies(list(orphans))
        self.clinical_traffic()
        self.billing_traffic()
        self.sessions()
        self.infra_background()
        self.trail_reads()
        self.audit.sort(key=lambda e: e.event_time_us)
        self.infra.sort(key=lambda e: e.event_time_us)
        self.access.sort(key=lambda e: e.time_us)
        return Scenario(self.cfg, self.start_us, self.end_us, self.cfg.timezone,
                        self.patients, self.practitioners, self.encounters, self.audit,
                        self.infra, self.access, self.care, self.labels)


def generate(config: ScenarioConfig | None = None,
             index: Callable[[str, str], str] | None = None) -> Scenario:
    """Build a scenario. ``index`` is the store's ``BlindIndex`` (``index("patient", id)``);
    without it a keyed SHA-256 stands in (for looking at a scenario without a store)."""
    cfg = config or ScenarioConfig()
    if index is None:
        def index(kind: str, value: str) -> str:
            return sha256(f"{kind}|{value}".encode()).hexdigest()[:32] if value else ""
    return _Builder(cfg, index).build()
