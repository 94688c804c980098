"""The points each table is measured at: dense at small sizes, geometric beyond, capped by what the workers'
pools and staging hold (DESIGN §5)."""

from dataclasses import dataclass

from apex_serve.errors import InvalidArgument
from apex_serve.types import WorkerInfo

TABLE_FIELDS = {  # table: the grid fields it is measured over
    "t_lin": ("lin_tokens",),
    "t_pref": ("pref_tokens", "pref_context"),
    "t_gatt": ("gatt_rows", "gatt_kv_tokens"),
    "t_catt": ("catt_rows", "catt_kv_tokens"),
    "t_xfer": ("xfer_rows",),
    "t_sync": (),
    "t_step": ("step_requests",),
}


@dataclass(frozen=True)
class Grid:
    lin_tokens: tuple[int, ...]
    pref_tokens: tuple[int, ...]
    gatt_rows: tuple[int, ...]
    gatt_kv_tokens: tuple[int, ...]
    catt_rows: tuple[int, ...]
    catt_kv_tokens: tuple[int, ...]
    xfer_rows: tuple[int, ...]
    step_requests: tuple[int, ...]
    pref_context: tuple[int, ...] = (0,)  # tokens before a prefill chunk; 0: a whole prompt

    def __post_init__(self) -> None:
        for name, values in self.__dict__.items():
            if not values:
                raise InvalidArgument(f"grid.{name}", "must not be empty")
            low = 0 if name == "pref_context" else 1
            if any(v < low for v in values) or list(values) != sorted(set(values)):
                raise InvalidArgument(f"grid.{name}", f"must be >= {low} and strictly increasing, got {values}")

    def points(self, table: str) -> list[tuple[int, int]]:
        fields = TABLE_FIELDS[table]
        if not fields:
            return [(0, 0)]
        if len(fields) == 1:
            return [(x, 0) for x in getattr(self, fields[0])]
        return [(x, y) for x in getattr(self, fields[0]) for y in getattr(self, fields[1])]


def _geometric(start: int, stop: int, factor: int) -> list[int]:
    values, v = [], start
    while v <= stop:
        values.append(v)
        v *= factor
    return values


def _capped(values: list[int], cap: int) -> tuple[int, ...]:
    kept = [v for v in values if v <= cap]
    return tuple(kept) if kept else (max(1, cap),)


def default_grid(info: WorkerInfo, quick: bool) -> Grid:
    """Quick: a coarse grid; full: denser. KV tokens leave room for one partial block per row."""
    factor = 4 if quick else 2
    dense = list(range(1, 9)) if quick else list(range(1, 17))
    rows = [1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64]
    gpu_cap = (info.num_kv_blocks - 64) * info.block_size
    cpu_cap = (info.num_cpu_kv_blocks - 64) * info.block_size
    kv = _geometric(256, 1 << 20, factor)
    return Grid(
        lin_tokens=tuple(sorted(set(dense + _geometric(dense[-1] * 2, 4096, factor)))),
        pref_tokens=_capped(_geometric(16, 2048, factor), info.max_model_len),
        gatt_rows=tuple(rows),
        gatt_kv_tokens=_capped(kv, gpu_cap),
        catt_rows=_capped(rows, info.cpu_max_rows),
        catt_kv_tokens=_capped(kv, cpu_cap),
        xfer_rows=_capped(rows, info.cpu_max_rows),
        step_requests=tuple(rows + [256]),
    )
