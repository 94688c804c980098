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


KV_LIMIT = 1 << 20  # KV tokens over the rows measured at most, whatever the pool holds
PREF_TOKENS_LIMIT = 2048  # prefill chunk tokens measured at most
PREF_CONTEXT_LIMIT = 1 << 15  # context tokens before a chunk measured at most


def _geometric(start: int, stop: int, factor: int) -> list[int]:
    values, v = [], start
    while v <= stop:
        values.append(v)
        v *= factor
    return values


def _up_to(values: list[int], cap: int) -> tuple[int, ...]:
    """values within cap, and cap itself where it cuts values short or leaves fewer than two points: the axis
    reaches what the worker holds. cap >= 1."""
    kept = [v for v in values if v <= cap]
    if (len(kept) < len(values) or len(kept) < 2) and cap not in kept:
        kept.append(cap)
    return tuple(kept)


def pool_axes(base_rows: list[int], row_limit: int, num_blocks: int, block_size: int, factor: int
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Decode rows and KV tokens over the rows whose every combination fits a pool of num_blocks: a point (r, kv)
    holds r rows of ceil(kv / r / block_size) blocks each. Rows stop at about half the pool (two rows in a pool of
    two or three blocks) and at row_limit; KV tokens stop at the most that every row count holds (r rows of
    num_blocks // r blocks), start at the row count (every row attends to at least one token), and take two points
    whenever the pool allows."""
    rows = _up_to(base_rows, max(1, min(row_limit, max(min(2, num_blocks), num_blocks // 2))))
    if num_blocks < 1:
        return rows[:1], (1,)
    cap = min([KV_LIMIT] + [r * block_size * (num_blocks // r) for r in rows])
    low = rows[-1]
    kv = [v for v in _geometric(64, cap, factor) if low <= v < cap] + [cap]
    if len(kv) < 2 and cap > low:
        kv.insert(0, max(low, cap // factor))
    return rows, tuple(kv)


def pref_axes(max_model_len: int, factor: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk tokens (geometric from 16) and the context before the chunk (0: a whole prompt, then geometric from
    128), every combination within max_model_len: chunks take up to half of it, contexts the rest."""
    tokens = _up_to(_geometric(16, PREF_TOKENS_LIMIT, factor), max(1, min(PREF_TOKENS_LIMIT, max_model_len // 2)))
    context_cap = min(PREF_CONTEXT_LIMIT, max_model_len - tokens[-1])
    if context_cap < 1:
        return tokens, (0,)
    return tokens, (0, *_up_to(_geometric(128, PREF_CONTEXT_LIMIT, 4), context_cap))


def default_grid(info: WorkerInfo, quick: bool) -> Grid:
    """Quick: a coarse grid; full: denser. Every point fits the live workers: prefill within max_model_len,
    accelerator attention within the device pool, CPU attention within the CPU pool and the rows one step stages."""
    factor = 4 if quick else 2
    dense = list(range(1, 9)) if quick else list(range(1, 17))
    rows = [1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64]
    gatt_rows, gatt_kv = pool_axes(rows, info.num_kv_blocks, info.num_kv_blocks, info.block_size, factor)
    catt_rows, catt_kv = pool_axes(rows, info.cpu_max_rows, info.num_cpu_kv_blocks, info.block_size, factor)
    pref_tokens, pref_context = pref_axes(info.max_model_len, factor)
    return Grid(
        lin_tokens=tuple(sorted(set(dense + _geometric(dense[-1] * 2, 4096, factor)))),
        pref_tokens=pref_tokens,
        gatt_rows=gatt_rows,
        gatt_kv_tokens=gatt_kv,
        catt_rows=catt_rows,
        catt_kv_tokens=catt_kv,
        xfer_rows=_up_to(rows, max(1, info.cpu_max_rows)),
        step_requests=tuple(rows + [256]),
        pref_context=pref_context,
    )
