"""phiaudit.rules: correlation and anomaly rules, as data, compiled to ClickHouse SQL.

Rules are YAML (the Sigma vocabulary: detection selections and a condition, correlations
``event_count``, ``value_count``, ``temporal``, ``temporal_ordered``, ``group-by``,
``timespan``; plus ``absent``, ``lookup`` and ``none``); see docs/rules.md. Built-in rules
ship in ``phiaudit/rules/builtin/``. ``RuleEngine`` evaluates them on a schedule with a
watermark (or over a past period), deduplicates, and appends alerts to the ``alerts`` table::

    config = RulesConfig.from_mapping(service_config.rules)
    engine = RuleEngine(store, submit, encoder, load_rules(config), config)
    engine.run_due()            # every interval_s
    engine.backfill(start_us, end_us)
"""

from ._care import OPEN_END_US, CareFileError, care_rows, care_rows_from_bytes
from ._compile import Compiled, compile_rule, two_stage
from ._config import BUILTIN_RULE_IDS, RulesConfig, builtin_rules, load_rules
from ._engine import RuleEngine, alert_id
from ._model import Rule
from ._parse import load_rule_file, parse_rule
from ._sinks import (
    AlertMessage,
    DeliveryFailed,
    OtlpSink,
    Sink,
    StdoutSink,
    WebhookSink,
    build_sinks,
    deliver_pending,
)

__all__ = [
    "BUILTIN_RULE_IDS",
    "OPEN_END_US",
    "AlertMessage",
    "CareFileError",
    "Compiled",
    "DeliveryFailed",
    "OtlpSink",
    "Rule",
    "RuleEngine",
    "RulesConfig",
    "Sink",
    "StdoutSink",
    "WebhookSink",
    "alert_id",
    "build_sinks",
    "builtin_rules",
    "care_rows",
    "care_rows_from_bytes",
    "compile_rule",
    "deliver_pending",
    "load_rule_file",
    "load_rules",
    "parse_rule",
    "two_stage",
]
