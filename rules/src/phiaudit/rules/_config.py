"""The ``rules:`` section of the service configuration, and loading the rules it names.

::

    rules:
      enabled: true          # run the engine in the service
      interval_s: 60         # how often the service evaluates due windows
      lateness_s: 120        # a window is evaluated once it ended this long ago
      step_s: 60             # window grid (a rule may set its own `step`)
      builtins: true         # the built-in rules (phiaudit/rules/builtin/*.yaml)
      rule_files: [/etc/phiaudit/rules/]   # more YAML files or directories of them
      disabled: [off-hours]
      settings:              # per rule: parameter values, `enabled`, `severity`
        bulk-access: {threshold: 100}
      sinks: [{type: webhook, url: "https://alertmanager:9093/api/v2/alerts"}, {type: stdout}]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from phiaudit.storage import ConfigError

from ._model import Rule
from ._parse import load_rule_file

__all__ = ["BUILTIN_RULE_IDS", "RulesConfig", "builtin_rules", "load_rules"]

BUILTIN_RULE_IDS = (
    "bulk-access", "large-export", "off-hours", "failed-auth-user", "failed-auth-source",
    "success-after-failures", "no-care-relationship", "break-glass", "app-bypass",
    "audit-read-refused", "failed-auth-cloud",
)

_KEYS = {"enabled", "interval_s", "lateness_s", "step_s", "builtins", "rule_files",
         "settings", "disabled", "sinks"}


@dataclass(frozen=True)
class RulesConfig:
    enabled: bool = True
    interval_s: int = 60
    lateness_s: int = 120
    step_s: int = 60
    builtins: bool = True
    rule_files: tuple[str, ...] = ()
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    disabled: tuple[str, ...] = ()
    sinks: tuple[Mapping[str, Any], ...] = ()

    def __repr__(self) -> str:  # sink headers and URLs may carry credentials
        return (f"RulesConfig(enabled={self.enabled}, interval_s={self.interval_s}, "
                f"lateness_s={self.lateness_s}, step_s={self.step_s}, "
                f"builtins={self.builtins}, rule_files={list(self.rule_files)!r}, "
                f"disabled={list(self.disabled)!r}, settings=[{len(self.settings)} rules], "
                f"sinks=[{len(self.sinks)} sinks, REDACTED])")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> RulesConfig:
        """Validate the ``rules:`` section; ``ConfigError`` lists every error with its path."""
        raw = dict(mapping or {})
        errors: list[str] = []
        for key in raw:
            if key not in _KEYS:
                errors.append(f"rules: unknown key {key!r}" if isinstance(key, str)
                              and len(key) < 40 else "rules: unknown key")

        def boolean(key: str, default: bool) -> bool:
            v = raw.get(key, default)
            if not isinstance(v, bool):
                errors.append(f"rules.{key}: must be true or false")
                return default
            return v

        def integer(key: str, default: int, lo: int, hi: int) -> int:
            v = raw.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                errors.append(f"rules.{key}: an integer from {lo} to {hi}")
                return default
            return v

        enabled = boolean("enabled", True)
        builtins = boolean("builtins", True)
        interval = integer("interval_s", 60, 1, 86400)
        lateness = integer("lateness_s", 120, 0, 86400)
        step = integer("step_s", 60, 1, 86400)
        files = raw.get("rule_files", [])
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            errors.append("rules.rule_files: a list of paths")
            files = []
        disabled = raw.get("disabled", [])
        if not isinstance(disabled, list) or not all(isinstance(d, str) for d in disabled):
            errors.append("rules.disabled: a list of rule ids")
            disabled = []
        settings = raw.get("settings", {})
        if not isinstance(settings, dict):
            errors.append("rules.settings: a mapping of rule id: {parameter: value}")
            settings = {}
        for rid, values in settings.items():
            if not isinstance(values, dict):
                errors.append(f"rules.settings.{rid}: a mapping of parameter: value")
        sinks = raw.get("sinks", [])
        if not isinstance(sinks, list):
            errors.append("rules.sinks: a list of {type: webhook|otlp|stdout, ...}")
            sinks = []
        for i, sink in enumerate(sinks):
            if not isinstance(sink, dict) or sink.get("type") not in ("webhook", "otlp",
                                                                       "stdout"):
                errors.append(f"rules.sinks[{i}].type: webhook, otlp or stdout")
        if errors:
            raise ConfigError(errors)
        return cls(enabled, interval, lateness, step, builtins, tuple(files),
                   {str(k): dict(v) for k, v in settings.items()}, tuple(disabled),
                   tuple(dict(s) for s in sinks))


def builtin_rules() -> list[Rule]:
    """The rules shipped in the package (``phiaudit/rules/builtin/*.yaml``)."""
    out: list[Rule] = []
    errors: list[str] = []
    folder = resources.files("phiaudit.rules") / "builtin"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                try:
                    out.extend(load_rule_file(Path(path)))
                except ConfigError as exc:
                    errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return [replace(r, origin="builtin") for r in out]


def _files(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"rules.rule_files: no such file or directory: {p}")
    return out


def load_rules(config: RulesConfig) -> list[Rule]:
    """Built-ins and rule files, with ``settings`` applied; disabled rules are returned with
    ``enabled=False`` (listed, never evaluated). A file rule with a built-in's id replaces it."""
    errors: list[str] = []
    rules: dict[str, Rule] = {}
    if config.builtins:
        rules = {r.id: r for r in builtin_rules()}
    seen_files: set[str] = set()
    for path in _files(config.rule_files):
        try:
            loaded = load_rule_file(path)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        for r in loaded:
            if r.id in seen_files:
                errors.append(f"rule {r.id}: defined twice in the rule files")
            seen_files.add(r.id)
            rules[r.id] = r
    for rid in config.disabled:
        if rid not in rules:
            errors.append(f"rules.disabled: unknown rule {rid!r}")
    for rid, values in config.settings.items():
        if rid not in rules:
            errors.append(f"rules.settings.{rid}: unknown rule")
            continue
        try:
            rules[rid] = rules[rid].with_settings(values)
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    out = []
    for r in rules.values():
        if r.id in config.disabled and r.enabled:
            r = r.with_settings({"enabled": False})
        out.append(r)
    return out
