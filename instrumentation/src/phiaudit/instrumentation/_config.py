"""Typed configuration: what is PHI, and how audit spans are delivered.

Everything has a default that works out of the box: FHIR REST under ``/fhir``, login and
logout under ``/login`` and ``/logout``, a 256 MiB spool under the user's state directory.
Add what auto-instrumentation cannot guess (your own routes, your PHI tables) either in
Python::

    config = InstrumentationConfig(
        classification=ClassificationConfig(
            routes=(RouteRule("/api/patients/{patient_id}/notes", "Note",
                              patient_param="patient_id"),),
            phi_tables={"patients": "Patient", "notes": "Note"},
        ),
    )

or in a JSON/YAML file named by ``PHIAUDIT_INSTRUMENTATION_CONFIG`` with the same shape::

    {"classification": {"routes": [{"template": "/api/patients/{patient_id}/notes",
                                    "resource_type": "Note", "patient_param": "patient_id"}],
                        "phi_tables": {"patients": "Patient"}},
     "delivery": {"spool_dir": "/var/lib/myapp/phiaudit-spool"}}

:meth:`InstrumentationConfig.validate` reports every error with its key path; values are
never echoed (they could be anything).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from phiaudit.instrumentation._attributes import Action
from phiaudit.instrumentation.environment_variables import (
    PHIAUDIT_INSTRUMENTATION_CONFIG,
    PHIAUDIT_SPOOL_DIR,
    PHIAUDIT_SPOOL_MAX_BYTES,
)


class InstrumentationError(Exception):
    """Base of the errors this package defines. Raised only from explicit calls made at
    start-up (loading a configuration); never from the hooks that run per request."""


class ConfigError(InstrumentationError):
    """The configuration is invalid; ``errors`` lists every problem with its key path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid phiaudit instrumentation config: " + "; ".join(errors))
        self.errors = errors


#: FHIR resource types that carry no PHI (conformance, terminology, administration).
DEFAULT_NON_PHI_FHIR_TYPES: frozenset[str] = frozenset(
    {
        "metadata",
        "CapabilityStatement",
        "StructureDefinition",
        "ValueSet",
        "CodeSystem",
        "ConceptMap",
        "NamingSystem",
        "OperationDefinition",
        "SearchParameter",
        "CompartmentDefinition",
        "ImplementationGuide",
        "TerminologyCapabilities",
        "Organization",
        "Location",
        "Endpoint",
        "HealthcareService",
        "Practitioner",
        "PractitionerRole",
        "Medication",
        "Substance",
        "Questionnaire",
        "PlanDefinition",
        "ActivityDefinition",
        "Library",
        "Measure",
        "StructureMap",
        "GraphDefinition",
    }
)


@dataclass(frozen=True)
class RouteRule:
    """An application route that touches PHI.

    ``template`` uses ``{name}`` for path parameters (Flask's ``<name>``/``<int:name>`` and
    Django's ``<int:name>`` are accepted too); it is compared with ``http.route`` and, when
    that is absent, matched against the URL path. The action follows the HTTP method (GET
    read, or search when the template has no parameter; POST create; PUT/PATCH update;
    DELETE delete) unless ``actions`` maps the method to another one.
    """

    template: str
    resource_type: str
    patient_param: str | None = None
    id_param: str | None = None
    actions: Mapping[str, Action] = field(default_factory=dict)
    purpose: str | None = None


@dataclass(frozen=True)
class ClassificationConfig:
    """What makes a span an audit event."""

    fhir_base_paths: tuple[str, ...] = ("/fhir",)
    fhir_non_phi_types: frozenset[str] = DEFAULT_NON_PHI_FHIR_TYPES
    routes: tuple[RouteRule, ...] = ()
    #: table name (case-insensitive, schema prefix ignored) -> resource type
    phi_tables: Mapping[str, str] = field(default_factory=dict)
    #: route template or path -> ``login`` / ``logout``
    auth_routes: Mapping[str, Action] = field(
        default_factory=lambda: {"/login": Action.LOGIN, "/logout": Action.LOGOUT}
    )
    #: keep database client spans recorded (not exported) until their statement is known,
    #: so a PHI query under an unsampled parent is still audited
    record_db_candidates: bool = True


def _default_spool_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "phiaudit", "spool")


@dataclass(frozen=True)
class DeliveryConfig:
    """How PHI audit spans reach the exporter: never dropped silently."""

    spool_dir: str = field(
        default_factory=lambda: os.environ.get(PHIAUDIT_SPOOL_DIR) or _default_spool_dir()
    )
    spool_max_bytes: int = field(
        default_factory=lambda: _int_env(PHIAUDIT_SPOOL_MAX_BYTES, 256 * 1024 * 1024)
    )
    queue_size: int = 2048
    max_batch: int = 512
    #: longest time an application thread may wait on the audit path, in seconds
    max_block_seconds: float = 0.05
    #: longest time a batch is filled before it is exported, in seconds (a batch is sent
    #: sooner when it reaches ``max_batch`` or on ``force_flush``)
    schedule_delay_seconds: float = 0.2
    #: an export still running after this long is treated as hanging: its batch is copied
    #: to the spool (deleted again if the export succeeds) and new batches go to the spool
    export_hang_seconds: float = 1.0
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    #: drops are reported in the log at most once per interval, in seconds
    report_interval_seconds: float = 60.0
    fsync: bool = True


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        return -1  # reported by validate() as an invalid value


@dataclass(frozen=True)
class InstrumentationConfig:
    """The whole configuration of ``phiaudit.instrumentation``."""

    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)

    def validate(self) -> list[str]:
        """Every problem, as ``key.path: message``; empty when valid."""
        errors: list[str] = []
        c = self.classification
        for i, base in enumerate(c.fhir_base_paths):
            if not isinstance(base, str) or (base and not base.startswith("/")):
                errors.append(f"classification.fhir_base_paths[{i}]: must start with '/'")
        for i, rule in enumerate(c.routes):
            key = f"classification.routes[{i}]"
            if not isinstance(rule.template, str) or not rule.template.startswith("/"):
                errors.append(f"{key}.template: must start with '/'")
            if not isinstance(rule.resource_type, str) or not rule.resource_type:
                errors.append(f"{key}.resource_type: required")
            for method, action in rule.actions.items():
                if not isinstance(action, Action):
                    errors.append(f"{key}.actions.{method}: not a known action")
        for route, action in c.auth_routes.items():
            if action not in (Action.LOGIN, Action.LOGOUT):
                errors.append(f"classification.auth_routes.{route}: must be login or logout")
        for table, rtype in c.phi_tables.items():
            if not isinstance(table, str) or not table or not isinstance(rtype, str):
                errors.append("classification.phi_tables: names and types must be strings")
                break
        d = self.delivery
        if not d.spool_dir:
            errors.append("delivery.spool_dir: required")
        for name in ("spool_max_bytes", "queue_size", "max_batch"):
            if not isinstance(getattr(d, name), int) or getattr(d, name) <= 0:
                errors.append(f"delivery.{name}: must be a positive integer")
        for name in (
            "max_block_seconds",
            "schedule_delay_seconds",
            "export_hang_seconds",
            "retry_initial_seconds",
            "retry_max_seconds",
            "report_interval_seconds",
        ):
            value = getattr(d, name)
            if not isinstance(value, int | float) or value < 0:
                errors.append(f"delivery.{name}: must be a non-negative number")
        return errors

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InstrumentationConfig:
        """Build from plain data (parsed JSON/YAML); raises :class:`ConfigError`."""
        errors: list[str] = []
        if not isinstance(data, Mapping):
            raise ConfigError(["<root>: must be a mapping"])
        _unknown(data, {"classification", "delivery"}, "", errors)
        cdata = data.get("classification") or {}
        ddata = data.get("delivery") or {}
        classification = ClassificationConfig()
        delivery = DeliveryConfig()
        if not isinstance(cdata, Mapping):
            errors.append("classification: must be a mapping")
        else:
            classification = _classification(cdata, errors)
        if not isinstance(ddata, Mapping):
            errors.append("delivery: must be a mapping")
        else:
            known = {f.name for f in fields(DeliveryConfig)}
            _unknown(ddata, known, "delivery.", errors)
            try:
                delivery = DeliveryConfig(**{k: v for k, v in ddata.items() if k in known})
            except (TypeError, ValueError):
                errors.append("delivery: invalid values")
        config = cls(classification=classification, delivery=delivery)
        errors.extend(config.validate())
        if errors:
            raise ConfigError(errors)
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> InstrumentationConfig:
        """Load a ``.json``, ``.yaml`` or ``.yml`` file; raises :class:`ConfigError`."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"<file>: cannot read ({type(exc).__name__})"]) from exc
        try:
            if p.suffix in (".yaml", ".yml"):
                try:
                    import yaml  # optional: only for YAML configuration files
                except ImportError as exc:
                    raise ConfigError(["<file>: YAML needs PyYAML installed"]) from exc
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ConfigError:
            raise
        except Exception as exc:  # a parse error; its message may quote the file
            raise ConfigError([f"<file>: not valid {p.suffix or 'JSON'}"]) from exc
        return cls.from_mapping(data or {})

    @classmethod
    def from_env(cls) -> InstrumentationConfig:
        """The file named by ``PHIAUDIT_INSTRUMENTATION_CONFIG``, else the defaults."""
        path = os.environ.get(PHIAUDIT_INSTRUMENTATION_CONFIG)
        config = cls.from_file(path) if path else cls()
        errors = config.validate()
        if errors:
            raise ConfigError(errors)
        return config


def _unknown(data: Mapping[str, Any], known: set[str], prefix: str, errors: list[str]) -> None:
    errors.extend(f"{prefix}{key}: unknown key" for key in data if key not in known)


def _action(value: Any, key: str, errors: list[str]) -> Action | None:
    try:
        return Action(value)
    except ValueError:
        errors.append(f"{key}: not a known action")
        return None


def _classification(data: Mapping[str, Any], errors: list[str]) -> ClassificationConfig:
    known = {f.name for f in fields(ClassificationConfig)}
    _unknown(data, known, "classification.", errors)
    kwargs: dict[str, Any] = {}
    if "fhir_base_paths" in data:
        kwargs["fhir_base_paths"] = tuple(data["fhir_base_paths"] or ())
    if "fhir_non_phi_types" in data:
        kwargs["fhir_non_phi_types"] = frozenset(data["fhir_non_phi_types"] or ())
    if "phi_tables" in data:
        tables = data["phi_tables"] or {}
        if isinstance(tables, list):  # a plain list: the resource type is the table name
            tables = {str(t): str(t) for t in tables}
        if not isinstance(tables, Mapping):
            errors.append("classification.phi_tables: must be a mapping or a list")
        else:
            kwargs["phi_tables"] = dict(tables)
    if "auth_routes" in data:
        auth: dict[str, Action] = {}
        for route, action in (data["auth_routes"] or {}).items():
            parsed = _action(action, f"classification.auth_routes.{route}", errors)
            if parsed is not None:
                auth[str(route)] = parsed
        kwargs["auth_routes"] = auth
    if "record_db_candidates" in data:
        kwargs["record_db_candidates"] = bool(data["record_db_candidates"])
    rules: list[RouteRule] = []
    for i, raw in enumerate(data.get("routes") or ()):
        key = f"classification.routes[{i}]"
        if not isinstance(raw, Mapping):
            errors.append(f"{key}: must be a mapping")
            continue
        rule_known = {f.name for f in fields(RouteRule)}
        _unknown(raw, rule_known, f"{key}.", errors)
        actions: dict[str, Action] = {}
        for method, action in (raw.get("actions") or {}).items():
            parsed = _action(action, f"{key}.actions.{method}", errors)
            if parsed is not None:
                actions[str(method).upper()] = parsed
        if "template" not in raw or "resource_type" not in raw:
            errors.append(f"{key}: template and resource_type are required")
            continue
        rules.append(
            RouteRule(
                template=raw["template"],
                resource_type=raw["resource_type"],
                patient_param=raw.get("patient_param"),
                id_param=raw.get("id_param"),
                actions=actions,
                purpose=raw.get("purpose"),
            )
        )
    if rules:
        kwargs["routes"] = tuple(rules)
    try:
        return ClassificationConfig(**kwargs)
    except TypeError:
        errors.append("classification: invalid values")
        return ClassificationConfig()
