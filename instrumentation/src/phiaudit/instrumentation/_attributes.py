"""Attribute names of the audit contract (CONTRACT.md section 1) and their closed vocabularies.

The names are promised to the receiver: change one only together with its tests, its
documentation and a CHANGELOG entry.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

PHI_AUDIT_EVENT: Final = "phi.audit.event"
PHI_AUDIT_ACTION: Final = "phi.audit.action"
PHI_AUDIT_OUTCOME: Final = "phi.audit.outcome"
PHI_RESOURCE_TYPE: Final = "phi.resource.type"
PHI_RESOURCE_ID: Final = "phi.resource.id"
PHI_PATIENT_ID: Final = "phi.patient.id"
PHI_RECORD_COUNT: Final = "phi.record.count"
PHI_QUERY: Final = "phi.query"
PHI_PURPOSE: Final = "phi.purpose"
PHI_DISCLOSURE_RECIPIENT: Final = "phi.disclosure.recipient"
PHI_ACTOR_TYPE: Final = "phi.actor.type"
PHI_DEVICE_ID: Final = "phi.device.id"

#: Name of a span event that is an audit event of its own (several accesses in one span).
PHI_ACCESS_EVENT: Final = "phi.access"

# Standard OpenTelemetry attributes this package reads or writes.
ENDUSER_ID: Final = "enduser.id"
USER_ID: Final = "user.id"
USER_ROLES: Final = "user.roles"
CLIENT_ADDRESS: Final = "client.address"
USER_AGENT: Final = "user_agent.original"
HTTP_METHOD: Final = "http.request.method"
HTTP_METHOD_OLD: Final = "http.method"
HTTP_ROUTE: Final = "http.route"
HTTP_STATUS: Final = "http.response.status_code"
HTTP_STATUS_OLD: Final = "http.status_code"
URL_PATH: Final = "url.path"
URL_QUERY: Final = "url.query"
URL_FULL: Final = "url.full"
HTTP_TARGET: Final = "http.target"
HTTP_URL: Final = "http.url"
DB_SYSTEM: Final = "db.system"
DB_SYSTEM_NAME: Final = "db.system.name"
DB_COLLECTION: Final = "db.collection.name"
DB_SQL_TABLE: Final = "db.sql.table"
DB_QUERY_TEXT: Final = "db.query.text"
DB_STATEMENT: Final = "db.statement"

#: Standard attributes that may carry a query string with PHI in it.
QUERY_CARRYING: Final = (URL_QUERY, HTTP_TARGET, URL_FULL, HTTP_URL)

#: What replaces a query string moved into ``phi.query``.
REDACTED: Final = "REDACTED"


class Action(StrEnum):
    """``phi.audit.action``: what was done to the PHI."""

    READ = "read"
    SEARCH = "search"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    DISCLOSE = "disclose"
    EXPORT = "export"
    PRINT = "print"
    LOGIN = "login"
    LOGOUT = "logout"
    BREAK_GLASS = "break_glass"


class Outcome(StrEnum):
    """``phi.audit.outcome``."""

    SUCCESS = "success"
    FAILURE = "failure"


class ActorType(StrEnum):
    """``phi.actor.type``: who acted."""

    USER = "user"
    SYSTEM = "system"
    PATIENT = "patient"
