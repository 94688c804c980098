"""Measured per-layer time tables and their interpolation (DESIGN §5): piecewise-linear in one variable, bilinear on
a grid in two, linear extrapolation from the outermost segment (cell), never below zero. A table with one point on an
axis is constant along it. PerformanceTables is the profiler's JSON contract (apex_serve.measurement.TABLE_VERSION):

    {"version": TABLE_VERSION, "key": {...}, "num_layers": L, "tables": {"t_lin": {"xs": [...], "ys": [...]}, ...,
     "t_gatt": {"xs": [...], "ys": [...], "zs": [[...], ...]}, ...}}

Evaluation is on the scheduler's hot path: one bisect per axis and a few multiplications, no allocation.
The profile's "ranges" (profiler_service.ranges) say per table and axis what was measured and what serving can ask;
describe_ranges words them for the logs and the profile summary."""

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apex_serve.measurement import TABLE_VERSION


def _check_axis(name: str, axis: tuple[float, ...]) -> None:
    if not axis:
        raise ValueError(f"{name}: must not be empty")
    if any(b <= a for a, b in itertools.pairwise(axis)):
        raise ValueError(f"{name}: must be strictly increasing, got {list(axis)}")


def _cell(axis: tuple[float, ...], x: float) -> tuple[int, float]:
    """Segment i of axis that x falls in or extrapolates from, and x's position t in it (0 at axis[i], 1 at
    axis[i + 1]; outside [0, 1] when extrapolating). A one-point axis gives (0, 0)."""
    if len(axis) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(axis, x) - 1, 0), len(axis) - 2)
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


@dataclass(frozen=True)
class Table1D:
    xs: tuple[float, ...]  # strictly increasing
    ys: tuple[float, ...]  # ns per layer at each x

    def __post_init__(self) -> None:
        _check_axis("xs", self.xs)
        if len(self.ys) != len(self.xs):
            raise ValueError(f"ys: must have {len(self.xs)} values like xs, got {len(self.ys)}")

    def __call__(self, x: float) -> float:
        i, t = _cell(self.xs, x)
        if t == 0.0:
            return max(0.0, self.ys[i])
        y0 = self.ys[i]
        return max(0.0, y0 + (self.ys[i + 1] - y0) * t)

    def to_json(self) -> dict[str, list[float]]:
        return {"xs": list(self.xs), "ys": list(self.ys)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Table1D":
        return cls(tuple(float(x) for x in data["xs"]), tuple(float(y) for y in data["ys"]))


@dataclass(frozen=True)
class Table2D:
    xs: tuple[float, ...]  # strictly increasing, e.g. decode rows
    ys: tuple[float, ...]  # strictly increasing, e.g. KV tokens summed over the rows
    zs: tuple[tuple[float, ...], ...]  # [len(xs)][len(ys)] ns per layer

    def __post_init__(self) -> None:
        _check_axis("xs", self.xs)
        _check_axis("ys", self.ys)
        if len(self.zs) != len(self.xs) or any(len(row) != len(self.ys) for row in self.zs):
            raise ValueError(f"zs: must be {len(self.xs)} x {len(self.ys)} (xs by ys)")

    def __call__(self, x: float, y: float) -> float:
        i, t = _cell(self.xs, x)
        j, u = _cell(self.ys, y)
        row0 = self.zs[i]
        z00 = row0[j]
        z01 = row0[j + 1] if u != 0.0 else z00
        if t == 0.0:
            return max(0.0, z00 + (z01 - z00) * u)
        row1 = self.zs[i + 1]
        z10 = row1[j]
        z11 = row1[j + 1] if u != 0.0 else z10
        low = z00 + (z01 - z00) * u
        high = z10 + (z11 - z10) * u
        return max(0.0, low + (high - low) * t)

    def to_json(self) -> dict[str, list[Any]]:
        return {"xs": list(self.xs), "ys": list(self.ys), "zs": [list(row) for row in self.zs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Table2D":
        return cls(
            tuple(float(x) for x in data["xs"]),
            tuple(float(y) for y in data["ys"]),
            tuple(tuple(float(z) for z in row) for row in data["zs"]),
        )


_TABLE_KINDS: dict[str, type[Table1D] | type[Table2D]] = {
    "t_lin": Table1D,  # tokens in the iteration -> ns per layer
    "t_pref": Table2D,  # prefill tokens of one request, context tokens before them -> ns per layer (attention, KV)
    "t_gatt": Table2D,  # GPU decode rows, GPU KV tokens over the rows -> ns per layer
    "t_catt": Table2D,  # CPU decode rows, CPU KV tokens over the rows -> ns per layer
    "t_xfer": Table1D,  # bytes staged per layer (q, k, v out and o back) -> ns per layer
    "t_sync": Table1D,  # one point at x = 0: doorbell round trip, ns per layer
    "t_step": Table1D,  # requests in the iteration -> ns per iteration (the worker's step without its layers)
}


@dataclass(frozen=True)
class PerformanceTables:
    """One profile of one (hardware, model, dtype) key. Each table is a function of the subtask's size giving ns,
    so this class serves as the cost model's per-layer cost functions directly (cost_model.LayerCosts)."""

    num_layers: int
    t_lin: Table1D
    t_pref: Table2D
    t_gatt: Table2D
    t_catt: Table2D
    t_xfer: Table1D
    t_sync: Table1D
    t_step: Table1D
    key: dict[str, Any] = field(default_factory=dict, compare=False)  # opaque to the scheduler: the profiler's key

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {self.num_layers}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PerformanceTables":
        """Parse the profiler's JSON; ValueError naming the version, num_layers or the missing or malformed table."""
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"version: expected {TABLE_VERSION}, got {data.get('version')!r}")
        num_layers = data.get("num_layers")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):
            raise ValueError(f"num_layers: must be an integer, got {num_layers!r}")
        raw = data.get("tables")
        if not isinstance(raw, dict):
            raise ValueError("tables: missing or not an object")
        tables = {}
        for name, kind in _TABLE_KINDS.items():
            if name not in raw:
                raise ValueError(f"tables.{name}: missing")
            try:
                tables[name] = kind.from_json(raw[name])
            except (KeyError, TypeError, ValueError) as exc:
                detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise ValueError(f"tables.{name}: {detail}") from exc
        return cls(num_layers=num_layers, key=dict(data.get("key") or {}), **tables)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "key": dict(self.key),
            "num_layers": self.num_layers,
            "tables": {name: getattr(self, name).to_json() for name in _TABLE_KINDS},
        }


def describe_ranges(ranges: Mapping[str, list[dict[str, Any]]], caps: Mapping[str, int] | None = None) -> list[str]:
    """One line per table: each axis's measured range and where serving can go past it, which the table answers by
    linear extrapolation from its outermost cell. caps lower the serving ranges by the scheduler's own bounds
    ("batch_tokens": tokens per iteration, "requests": requests running at once). No ranges: no lines."""
    if not ranges:
        return []
    lines = ["measured ranges (beyond them a table extrapolates linearly from its outermost cell):"]
    for table, axes in ranges.items():
        lines.append(f"  {table:<7} " + "; ".join(_describe_axis(axis, caps or {}) for axis in axes))
    return lines


def _describe_axis(axis: Mapping[str, Any], caps: Mapping[str, int]) -> str:
    low, high = axis["measured"]
    serving_low, serving_high = axis["serving"]
    if axis.get("bound") in caps:
        serving_high = min(serving_high, caps[axis["bound"]])
    beyond = []
    if serving_high > high:
        beyond.append(f"beyond {high:,.0f} up to {serving_high:,.0f}")
    if serving_low < low:
        beyond.append(f"below {low:,.0f} down to {serving_low:,.0f}")
    verdict = ("extrapolated " + " and ".join(beyond) if beyond
               else f"covers serving's {serving_low:,.0f}..{serving_high:,.0f}")
    return f"{axis['axis']} {low:,.0f}..{high:,.0f}: {verdict}"
