"""What a profile measured against what serving can ask of it: per table and axis, the measured range (the table's
outermost points) and the range the live workers let a step reach (their pools, max_model_len, the rows one step
stages). Beyond the measured range a table extrapolates linearly from its outermost cell, so the summary names
every axis where serving can go past it. JSON (the profile's "ranges"):

    {"t_gatt": [{"axis": "decode rows", "measured": [1, 2], "serving": [1, 4], "bound": "requests"}, ...], ...}

bound names a scheduler setting that caps the axis further ("batch_tokens": tokens per iteration, "requests":
requests running at once), or is absent."""

import json

from apex_serve.types import WorkerInfo

_KV_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def _kv_bytes_per_token(info: WorkerInfo) -> int:
    """Bytes of one token's K and V in one layer of the CPU pool (what a chunk brings back per context token)."""
    if not info.model_config_json or info.cpu_kv_dtype not in _KV_BYTES:
        return 0
    config = json.loads(info.model_config_json)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * _KV_BYTES[info.cpu_kv_dtype] * (config.get("num_key_value_heads") or heads) * head_dim


def serving_axes(info: WorkerInfo) -> dict[str, list[tuple[str, int, int, str]]]:
    """Per table, each axis as (name, lowest, highest serving can ask, scheduler bound or "")."""
    device_tokens = info.num_kv_blocks * info.block_size
    cpu_tokens = info.num_cpu_kv_blocks * info.block_size
    axes = {
        "t_lin": [("tokens", 1, device_tokens + cpu_tokens, "batch_tokens")],
        "t_pref": [("chunk tokens", 1, info.max_model_len, "batch_tokens"),
                   ("context tokens", 0, info.max_model_len - 1, "")],
        "t_gatt": [("decode rows", 1, info.num_kv_blocks, "requests"), ("KV tokens", 1, device_tokens, "")],
        "t_step": [("requests", 1, info.num_kv_blocks + info.num_cpu_kv_blocks, "requests")],
    }
    if info.num_cpu_kv_blocks:
        staged = info.cpu_max_rows * info.bytes_per_cpu_row
        axes["t_catt"] = [("decode rows", 1, info.cpu_max_rows, "requests"), ("KV tokens", 1, cpu_tokens, "")]
        axes["t_xfer"] = [("bytes", info.bytes_per_cpu_row, max(staged, cpu_tokens * _kv_bytes_per_token(info)), "")]
    return axes


def table_ranges(tables: dict, info: WorkerInfo) -> dict[str, list[dict]]:
    """The ranges of every measured table with an axis (t_sync is one point), for the live workers in info."""
    axes = serving_axes(info)
    ranges = {}
    for name, table in tables.items():
        if name not in axes:
            continue
        measured = [table["xs"]] + ([table["ys"]] if "zs" in table else [])
        ranges[name] = [_axis_range(axis, values) for axis, values in zip(axes[name], measured)]
    return ranges


def _axis_range(axis: tuple[str, int, int, str], measured: list[float]) -> dict:
    name, low, high, bound = axis
    entry = {"axis": name, "measured": [min(measured), max(measured)], "serving": [low, high]}
    if bound:
        entry["bound"] = bound
    return entry
