"""FHIR REST interactions over HTTP, mapped to audit actions.

The mapping follows the FHIR REST API and the FHIR AuditEvent conventions:

=====================================  ==========  ===================================
request                                 action      resource / patient
=====================================  ==========  ===================================
``GET [type]/[id]``                     read        type, id; patient when type=Patient
``GET [type]/[id]/_history[/[vid]]``    read        (history, vread)
``GET [type]?params``, ``GET [type]``   search      patient from ``patient=``/``subject=``
``POST [type]/_search``                 search      (parameters may be in the body)
``GET Patient/[id]/[type]``             search      compartment search: patient = id
``POST [type]``                         create
``PUT``/``PATCH [type]/[id]``           update
``DELETE [type]/[id]``                  delete
``GET Patient/[id]/$everything``        read        patient = id
``[GET|POST] [[type]/[id]/]$export``    export
=====================================  ==========  ===================================

Conformance and terminology resources (``metadata``, ``ValueSet``, ...) are not PHI.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import parse_qsl

from opentelemetry.util.types import AttributeValue

from phiaudit.instrumentation._attributes import (
    PHI_AUDIT_ACTION,
    PHI_AUDIT_EVENT,
    PHI_PATIENT_ID,
    PHI_QUERY,
    PHI_RESOURCE_ID,
    PHI_RESOURCE_TYPE,
    Action,
)

#: search parameters whose value references the patient
PATIENT_PARAMS = frozenset(
    {
        "patient",
        "subject",
        "patient:Patient",
        "subject:Patient",
        "beneficiary",
        "beneficiary:Patient",
    }
)

_WRITE_ACTIONS = {
    "POST": Action.CREATE,
    "PUT": Action.UPDATE,
    "PATCH": Action.UPDATE,
    "DELETE": Action.DELETE,
}


def _is_type(segment: str) -> bool:
    return bool(segment) and segment[0].isupper() and segment.isalnum()


def patients_from_params(params: Iterable[tuple[str, str]], resource_type: str) -> list[str]:
    """Patient ids referenced by search parameters (``patient=123``, ``subject=Patient/1``,
    ``_id`` on a Patient search); comma-separated values are alternatives."""
    found: list[str] = []
    for name, value in params:
        if name in PATIENT_PARAMS or (resource_type == "Patient" and name == "_id"):
            for ref in value.split(","):
                ref = ref.strip()
                if "/" in ref:
                    head, _, tail = ref.rstrip("/").rpartition("/")
                    if not head.endswith("Patient"):
                        continue  # e.g. subject=Group/7: not a patient
                    ref = tail
                if ref and ref not in found:
                    found.append(ref)
    return found


class _LazyParams:
    """The query's parameters, parsed only if a branch reads them."""

    __slots__ = ("_query",)

    def __init__(self, query: str | None) -> None:
        self._query = query

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(parse_qsl(self._query or "", keep_blank_values=True))


def classify_fhir(
    method: str, path: str, query: str | None, non_phi: frozenset[str]
) -> dict[str, AttributeValue] | None:
    """Tags for a FHIR request; ``path`` is relative to the FHIR base (``Patient/123``)."""
    segs = [s for s in path.split("/") if s]
    if not segs:
        return None
    method = method.upper()
    tags: dict[str, AttributeValue] = {PHI_AUDIT_EVENT: True}
    params = _LazyParams(query)
    if query:
        tags[PHI_QUERY] = query
    patients: list[str] = []
    action: Action | None = None
    rtype = segs[0]

    if segs[-1] == "$export":  # system, type (Patient/$export) or instance (Group/1/$export)
        action = Action.EXPORT
        if len(segs) >= 2:
            tags[PHI_RESOURCE_TYPE] = rtype
        if len(segs) == 3:
            tags[PHI_RESOURCE_ID] = segs[1]
            if rtype == "Patient":
                patients.append(segs[1])
    elif segs[0] == "_search" and method == "POST":  # whole-system search
        action = Action.SEARCH
    elif not _is_type(rtype) or rtype in non_phi:
        return None
    else:
        tags[PHI_RESOURCE_TYPE] = rtype
        n = len(segs)
        if n == 1:
            action = Action.SEARCH if method == "GET" else _WRITE_ACTIONS.get(method)
            if method in ("PUT", "PATCH", "DELETE", "GET"):  # conditional or plain search
                patients = patients_from_params(params, rtype)
        elif n == 2 and segs[1] == "_search":
            action = Action.SEARCH if method == "POST" else None
            patients = patients_from_params(params, rtype)
        elif n == 2 and segs[1] == "_history":
            action = Action.READ if method == "GET" else None
        elif segs[1].startswith("$"):
            return None  # type-level operations other than $export: not classified
        else:
            rid = segs[1]
            tags[PHI_RESOURCE_ID] = rid
            if rtype == "Patient":
                patients.append(rid)
            if n == 2:
                action = Action.READ if method == "GET" else _WRITE_ACTIONS.get(method)
                if method == "POST":
                    action = None
            elif segs[2] == "_history":
                action = Action.READ if method == "GET" else None
            elif segs[2] == "$everything":
                action = Action.READ
            elif rtype == "Patient" and n == 3 and _is_type(segs[2]) and method == "GET":
                action = Action.SEARCH  # compartment search: Patient/123/Observation
                tags[PHI_RESOURCE_TYPE] = segs[2]
                del tags[PHI_RESOURCE_ID]
            else:
                return None
    if action is None:
        return None
    tags[PHI_AUDIT_ACTION] = action.value
    if patients:
        tags[PHI_PATIENT_ID] = patients[0] if len(patients) == 1 else tuple(patients)
    return tags
