"""Rows to Arrow, for the fastest insert path into ClickHouse (FORMAT Arrow).

Measured here: building the Arrow table and inserting it costs about a quarter of a
column-oriented clickhouse-connect insert of the same rows, and most of it runs in C++
without the GIL, which the receiver's event loop needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from ._schema import Column

__all__ = ["arrow_schema", "arrow_table"]


def _uuid_bytes(v: Any) -> bytes:
    return v if v.__class__ is bytes else v.bytes


def _map_items(v: Any) -> Any:
    return list(v.items()) if isinstance(v, dict) else v


def _plan(ch_type: str) -> tuple[pa.DataType, Callable[[list[Any]], list[Any]] | None]:
    t = ch_type
    if t.startswith("LowCardinality("):
        t = t[len("LowCardinality("):-1]
    if t == "UUID":
        return pa.binary(16), lambda col: [_uuid_bytes(v) for v in col]
    if t.startswith("DateTime64(6"):
        return pa.timestamp("us", tz="UTC"), None
    if t.startswith("DateTime64(9"):
        return pa.timestamp("ns", tz="UTC"), None
    if t == "String":
        return pa.binary(), None
    if t.startswith("FixedString("):
        return pa.binary(int(t[len("FixedString("):-1])), None
    if t == "Bool":
        return pa.bool_(), None
    ints = {"UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(),
            "UInt64": pa.uint64(), "Int64": pa.int64(), "Int32": pa.int32()}
    if t in ints:
        return ints[t], None
    if t.startswith("Array("):
        inner, conv = _plan(t[len("Array("):-1])
        if conv is None:
            return pa.list_(inner), None
        return pa.list_(inner), lambda col: [conv(list(v)) for v in col]
    if t.startswith("Map("):
        return pa.map_(pa.string(), pa.string()), lambda col: [_map_items(v) for v in col]
    raise ValueError(f"no Arrow mapping for {ch_type}")


class _TablePlan:
    def __init__(self, columns: Sequence[Column]) -> None:
        self.names = [c.name for c in columns]
        self.plans = [_plan(c.type) for c in columns]
        self.schema = pa.schema([pa.field(n, typ) for n, (typ, _) in zip(
            self.names, self.plans, strict=True)])


_plans: dict[tuple[str, ...], _TablePlan] = {}


def _table_plan(columns: Sequence[Column]) -> _TablePlan:
    key = tuple(f"{c.name}:{c.type}" for c in columns)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _TablePlan(columns)
    return plan


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    """The schema of ``arrow_table(columns, rows)``: the columns' names, in order, with the
    Arrow type of each ClickHouse type (nullable fields, no metadata). Cached per column list."""
    return _table_plan(columns).schema


def arrow_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]], *,
                given: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows (in ``columns`` order) as one Arrow table of schema ``arrow_schema(columns)``.

    ``given`` maps column names to ready Arrow arrays (one value per row) that are used
    instead of the rows' values of those columns (which are then not read).
    """
    plan = _table_plan(columns)
    if not rows:
        return plan.schema.empty_table()
    arrays = []
    for name, (typ, conv), column in zip(plan.names, plan.plans, zip(*rows, strict=True),
                                         strict=True):
        if given is not None and name in given:
            arrays.append(given[name])
            continue
        col: Any = column
        if conv is not None:
            col = conv(col)
        arrays.append(pa.array(col, typ))
    return pa.Table.from_arrays(arrays, schema=plan.schema)
