"""Where protobuf messages and domain types meet (the scheduler's GetStats answer: apex_serve.convert_stats)."""

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from apex_serve import types
from apex_serve.errors import InvalidArgument
from apex_serve.hardware import HardwareFingerprint
from apex_serve.v1 import common_pb2, gateway_pb2, gpu_worker_pb2, scheduler_pb2

_Domain = TypeVar("_Domain")


def _enum_from_pb(table: Mapping[int, _Domain], enum_type: EnumTypeWrapper, value: int, field: str) -> _Domain:
    """The domain value of a protobuf enum value; InvalidArgument naming the field for a value the table lacks
    (one this build does not know, or an UNSPECIFIED the field does not accept)."""
    try:
        return table[value]
    except KeyError:
        label = enum_type.Name(value) if value in enum_type.values() else str(value)
        accepted = ", ".join(enum_type.Name(v) for v in table)
        raise InvalidArgument(field, f"{enum_type.DESCRIPTOR.name} {label} is not one of {accepted}") from None


_FINISH_TO_PB = {
    types.FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    types.FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    types.FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PB: dict[int, types.FinishReason | None] = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,  # a message before the last one
    **{v: k for k, v in _FINISH_TO_PB.items()},
}

_MODE_TO_PB = {
    types.ExecutionMode.GPU_ONLY: common_pb2.EXECUTION_MODE_GPU_ONLY,
    types.ExecutionMode.ASYM_PIPELINE: common_pb2.EXECUTION_MODE_ASYM_PIPELINE,
    types.ExecutionMode.ASYNC_OVERLAP: common_pb2.EXECUTION_MODE_ASYNC_OVERLAP,
}
_MODE_FROM_PB = {
    common_pb2.EXECUTION_MODE_UNSPECIFIED: types.ExecutionMode.GPU_ONLY,  # unset: StepPlan's default mode
    **{v: k for k, v in _MODE_TO_PB.items()},
}


def mode_to_pb(mode: types.ExecutionMode) -> int:
    return _MODE_TO_PB[mode]


def mode_from_pb(value: int, field: str = "mode") -> types.ExecutionMode:
    """Raises InvalidArgument naming `field` for a value that is not an execution mode."""
    return _enum_from_pb(_MODE_FROM_PB, common_pb2.ExecutionMode, value, field)


_LAYOUT_TO_PB = {
    types.OverlapLayout.FUSED: common_pb2.OVERLAP_LAYOUT_FUSED,
    types.OverlapLayout.SPLIT: common_pb2.OVERLAP_LAYOUT_SPLIT,
}
_LAYOUT_FROM_PB = {
    common_pb2.OVERLAP_LAYOUT_UNSPECIFIED: types.OverlapLayout.FUSED,  # unset: StepPlan's default layout
    **{v: k for k, v in _LAYOUT_TO_PB.items()},
}


def layout_to_pb(layout: types.OverlapLayout) -> int:
    return _LAYOUT_TO_PB[layout]


def layout_from_pb(value: int, field: str = "layout") -> types.OverlapLayout:
    """Raises InvalidArgument naming `field` for a value that is not an overlap layout."""
    return _enum_from_pb(_LAYOUT_FROM_PB, common_pb2.OverlapLayout, value, field)


_PLACEMENT_TO_PB = {types.Placement.GPU: common_pb2.PLACEMENT_GPU, types.Placement.CPU: common_pb2.PLACEMENT_CPU}
_PLACEMENT_FROM_PB = {
    common_pb2.PLACEMENT_UNSPECIFIED: types.Placement.GPU,  # unset: read as GPU
    **{v: k for k, v in _PLACEMENT_TO_PB.items()},
}


def placement_from_pb(value: int, field: str = "placement") -> types.Placement:
    """Raises InvalidArgument naming `field` for a value that is not a placement."""
    return _enum_from_pb(_PLACEMENT_FROM_PB, common_pb2.Placement, value, field)


def finish_reason_to_pb(reason: types.FinishReason | None) -> int:
    return common_pb2.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PB[reason]


def finish_reason_from_pb(value: int, field: str = "finish_reason") -> types.FinishReason | None:
    """None for UNSPECIFIED (a request that is not finished); raises InvalidArgument naming `field` for a value
    that is not a finish reason."""
    return _enum_from_pb(_FINISH_FROM_PB, common_pb2.FinishReason, value, field)


_OPTIONAL_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "max_tokens", "min_tokens",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "skip_special_tokens",
)


def sampling_from_pb(msg: common_pb2.SamplingParams) -> types.SamplingParams:
    """Absent optional fields take the domain defaults; the domain type validates ranges."""
    present = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)}
    return types.SamplingParams(
        **present,
        seed=msg.seed if msg.HasField("seed") else None,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        truncate_prompt_tokens=msg.truncate_prompt_tokens if msg.HasField("truncate_prompt_tokens") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        allowed_token_ids=tuple(msg.allowed_token_ids),
        bad_words=tuple(msg.bad_words),
        bad_words_token_ids=tuple(tuple(word.ids) for word in msg.bad_words_token_ids),
        structured_grammar=msg.structured_grammar,
    )


def sampling_to_pb(params: types.SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        **{name: getattr(params, name) for name in _OPTIONAL_SAMPLING_FIELDS},
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        allowed_token_ids=params.allowed_token_ids,
        bad_words=params.bad_words,
        bad_words_token_ids=[common_pb2.SamplingParams.TokenIds(ids=ids) for ids in params.bad_words_token_ids],
        structured_grammar=params.structured_grammar,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.truncate_prompt_tokens is not None:
        msg.truncate_prompt_tokens = params.truncate_prompt_tokens
    return msg


def logprob_to_pb(lp: types.TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_pb(msg: common_pb2.TokenLogprob) -> types.TokenLogprob:
    return types.TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def hardware_to_pb(hw: HardwareFingerprint) -> common_pb2.HardwareFingerprint:
    return common_pb2.HardwareFingerprint(**dataclasses.asdict(hw))


def hardware_from_pb(msg: common_pb2.HardwareFingerprint) -> HardwareFingerprint:
    return HardwareFingerprint(
        msg.accelerator, msg.accelerator_memory_bytes, msg.cpu_model, msg.cpu_count, tuple(msg.cpus)
    )


def measure_request_to_pb(
    table: str, points: Sequence[tuple[int, int]], warmup: int, repeats: int
) -> common_pb2.MeasureRequest:
    return common_pb2.MeasureRequest(
        table=table, points=[common_pb2.MeasurePoint(x=x, y=y) for x, y in points], warmup=warmup, repeats=repeats
    )


def measure_points_from_pb(msg: common_pb2.MeasureRequest) -> list[tuple[int, int]]:
    return [(p.x, p.y) for p in msg.points]


def worker_info_to_pb(info: types.WorkerInfo) -> gpu_worker_pb2.WorkerInfo:
    return gpu_worker_pb2.WorkerInfo(
        model_name=info.model_name,
        num_layers=info.num_layers,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        eos_token_ids=info.eos_token_ids,
        block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks,
        device=info.device,
        dtype=info.dtype,
        num_cpu_kv_blocks=info.num_cpu_kv_blocks,
        hardware=None if info.hardware is None else hardware_to_pb(info.hardware),
        model_config_hash=info.model_config_hash,
        cpu_kv_dtype=info.cpu_kv_dtype,
        cpu_max_rows=info.cpu_max_rows,
        bytes_per_cpu_row=info.bytes_per_cpu_row,
        model_config_json=info.model_config_json,
        cpu_pool_attached=info.cpu_pool_attached,
        cpu_pool_generation=info.cpu_pool_generation,
        decode_attention=info.decode_attention,
    )


def worker_info_from_pb(msg: gpu_worker_pb2.WorkerInfo) -> types.WorkerInfo:
    return types.WorkerInfo(
        model_name=msg.model_name,
        num_layers=msg.num_layers,
        vocab_size=msg.vocab_size,
        max_model_len=msg.max_model_len,
        eos_token_ids=tuple(msg.eos_token_ids),
        block_size=msg.block_size,
        num_kv_blocks=msg.num_kv_blocks,
        device=msg.device,
        dtype=msg.dtype,
        num_cpu_kv_blocks=msg.num_cpu_kv_blocks,
        hardware=hardware_from_pb(msg.hardware) if msg.HasField("hardware") else None,
        model_config_hash=msg.model_config_hash,
        cpu_kv_dtype=msg.cpu_kv_dtype,
        cpu_max_rows=msg.cpu_max_rows,
        bytes_per_cpu_row=msg.bytes_per_cpu_row,
        model_config_json=msg.model_config_json,
        cpu_pool_attached=msg.cpu_pool_attached,
        cpu_pool_generation=msg.cpu_pool_generation,
        decode_attention=msg.decode_attention,
    )


def plan_to_pb(plan: types.StepPlan) -> gpu_worker_pb2.StepRequest:
    return gpu_worker_pb2.StepRequest(
        step_id=plan.step_id,
        mode=mode_to_pb(plan.mode),
        layout=layout_to_pb(plan.layout),
        new_requests=[
            gpu_worker_pb2.NewRequest(
                request_id=r.request_id,
                token_ids=r.token_ids,
                sampling=sampling_to_pb(r.sampling),
                block_ids=r.block_ids,
                num_output_tokens=r.num_output_tokens,
                placement=_PLACEMENT_TO_PB[r.placement],
                sub_batch=r.sub_batch,
                num_scheduled_tokens=r.num_scheduled_tokens,
            )
            for r in plan.new_requests
        ],
        cached_requests=[
            gpu_worker_pb2.CachedRequest(request_id=r.request_id, new_block_ids=r.new_block_ids, sub_batch=r.sub_batch,
                                         num_scheduled_tokens=r.num_scheduled_tokens)
            for r in plan.cached_requests
        ],
        freed_request_ids=plan.freed_request_ids,
        swap_out=[gpu_worker_pb2.Swap(request_id=s.request_id, block_ids=s.block_ids) for s in plan.swap_out],
        swap_in=[gpu_worker_pb2.Swap(request_id=s.request_id, block_ids=s.block_ids) for s in plan.swap_in],
        record_subtasks=plan.record_subtasks,
        cpu_wait_timeout_s=plan.cpu_wait_timeout_s,
        planned_ahead=plan.planned_ahead,
    )


def plan_from_pb(msg: gpu_worker_pb2.StepRequest) -> types.StepPlan:
    return types.StepPlan(
        step_id=msg.step_id,
        mode=mode_from_pb(msg.mode),
        layout=layout_from_pb(msg.layout),
        new_requests=tuple(
            types.NewRequestData(
                request_id=r.request_id,
                token_ids=tuple(r.token_ids),
                sampling=sampling_from_pb(r.sampling),
                block_ids=tuple(r.block_ids),
                num_output_tokens=r.num_output_tokens,
                placement=placement_from_pb(r.placement, f"new_requests[{i}].placement"),
                sub_batch=r.sub_batch,
                num_scheduled_tokens=r.num_scheduled_tokens,
            )
            for i, r in enumerate(msg.new_requests)
        ),
        cached_requests=tuple(
            types.CachedRequestData(
                request_id=r.request_id, new_block_ids=tuple(r.new_block_ids), sub_batch=r.sub_batch,
                num_scheduled_tokens=r.num_scheduled_tokens,
            )
            for r in msg.cached_requests
        ),
        freed_request_ids=tuple(msg.freed_request_ids),
        swap_out=tuple(types.SwapData(s.request_id, tuple(s.block_ids)) for s in msg.swap_out),
        swap_in=tuple(types.SwapData(s.request_id, tuple(s.block_ids)) for s in msg.swap_in),
        record_subtasks=msg.record_subtasks,
        cpu_wait_timeout_s=msg.cpu_wait_timeout_s,
        planned_ahead=msg.planned_ahead,
    )


_TIMINGS = tuple(f.name for f in dataclasses.fields(types.StepTimings))  # dataclasses.asdict deep-copies: 14x slower


def step_output_to_pb(output: types.StepOutput) -> gpu_worker_pb2.StepResponse:
    t = output.timings
    return gpu_worker_pb2.StepResponse(
        step_id=output.step_id,
        sampled=[
            gpu_worker_pb2.SampledToken(
                request_id=k,
                token_id=v,
                logprob=logprob_to_pb(output.logprobs[k]) if k in output.logprobs else None,
            )
            for k, v in output.sampled.items()
        ],
        timings=gpu_worker_pb2.StepTimings(**{name: getattr(t, name) for name in _TIMINGS}),
        subtasks=[subtask_to_pb(s) for s in output.subtasks],
        prompt_logprobs=[
            gpu_worker_pb2.PromptLogprobs(request_id=k, logprobs=[logprob_to_pb(lp) for lp in v])
            for k, v in output.prompt_logprobs.items()
        ],
    )


def step_output_from_pb(msg: gpu_worker_pb2.StepResponse) -> types.StepOutput:
    t = msg.timings
    return types.StepOutput(
        step_id=msg.step_id,
        sampled={s.request_id: s.token_id for s in msg.sampled},
        logprobs={s.request_id: logprob_from_pb(s.logprob) for s in msg.sampled if s.HasField("logprob")},
        timings=types.StepTimings(**{name: getattr(t, name) for name in _TIMINGS}),
        subtasks=tuple(subtask_from_pb(s, f"subtasks[{i}]") for i, s in enumerate(msg.subtasks)),
        prompt_logprobs={p.request_id: tuple(logprob_from_pb(lp) for lp in p.logprobs) for p in msg.prompt_logprobs},
    )


_SUBTASK_TO_PB = {
    types.SubtaskKind.DEVICE_LINEAR: gpu_worker_pb2.SUBTASK_KIND_DEVICE_LINEAR,
    types.SubtaskKind.DEVICE_ATTENTION: gpu_worker_pb2.SUBTASK_KIND_DEVICE_ATTENTION,
    types.SubtaskKind.STAGING: gpu_worker_pb2.SUBTASK_KIND_STAGING,
    types.SubtaskKind.CPU_ATTENTION: gpu_worker_pb2.SUBTASK_KIND_CPU_ATTENTION,
}
_SUBTASK_FROM_PB = {v: k for k, v in _SUBTASK_TO_PB.items()}


def subtask_to_pb(s: types.Subtask) -> gpu_worker_pb2.Subtask:
    return gpu_worker_pb2.Subtask(
        kind=_SUBTASK_TO_PB[s.kind], layer=s.layer, sub_batch=s.sub_batch,
        start_unix_ns=s.start_unix_ns, end_unix_ns=s.end_unix_ns,
    )


def subtask_from_pb(msg: gpu_worker_pb2.Subtask, field: str = "subtask") -> types.Subtask:
    """Raises InvalidArgument naming `field`.kind for a kind that is unset or unknown."""
    return types.Subtask(
        kind=_enum_from_pb(_SUBTASK_FROM_PB, gpu_worker_pb2.SubtaskKind, msg.kind, f"{field}.kind"),
        layer=msg.layer, sub_batch=msg.sub_batch, start_unix_ns=msg.start_unix_ns, end_unix_ns=msg.end_unix_ns,
    )


def usage_to_pb(prompt_tokens: int, completion_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def chat_messages_from_pb(messages: Iterable[gateway_pb2.ChatMessage]) -> tuple[dict[str, Any], ...]:
    """A conversation as the chat template takes it, in OpenAI's shape; empty optional fields are None."""
    return tuple(
        {
            "role": m.role, "content": m.content, "name": m.name or None, "tool_call_id": m.tool_call_id or None,
            "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ] or None,
        }
        for m in messages
    )


def json_object_from_pb(text: str, field: str) -> dict[str, Any]:
    """A JSON object carried as text (empty: none); InvalidArgument naming the field otherwise."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def submit_request_to_pb(
    request_id: str, prompt_token_ids: Sequence[int], sampling: types.SamplingParams
) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling_to_pb(sampling)
    )


def request_output_to_pb(out: types.RequestOutput) -> scheduler_pb2.SubmitResponse:
    msg = scheduler_pb2.SubmitResponse()
    fill_request_output_pb(msg, out)
    return msg


def fill_request_output_pb(msg: scheduler_pb2.SubmitResponse, out: types.RequestOutput) -> None:
    """out written into an empty msg, which may be nested in another message (building one and passing it to the
    outer one's constructor would copy it: this runs per request per token)."""
    msg.token_ids.extend(out.new_token_ids)
    msg.finished = out.finished
    msg.finish_reason = finish_reason_to_pb(out.finish_reason)
    usage = msg.usage
    usage.SetInParent()
    usage.prompt_tokens = out.num_prompt_tokens
    usage.completion_tokens = out.num_output_tokens
    usage.total_tokens = out.num_prompt_tokens + out.num_output_tokens
    if out.logprobs:
        msg.logprobs.extend(logprob_to_pb(lp) for lp in out.logprobs)
    if out.prompt_logprobs:
        msg.prompt_logprobs.extend(logprob_to_pb(lp) for lp in out.prompt_logprobs)


def request_output_from_pb(request_id: str, msg: scheduler_pb2.SubmitResponse) -> types.RequestOutput:
    return types.RequestOutput(
        request_id=request_id,
        new_token_ids=tuple(msg.token_ids),
        finished=msg.finished,
        finish_reason=finish_reason_from_pb(msg.finish_reason),
        num_prompt_tokens=msg.usage.prompt_tokens,
        num_output_tokens=msg.usage.completion_tokens,
        logprobs=tuple(logprob_from_pb(lp) for lp in msg.logprobs),
        prompt_logprobs=tuple(logprob_from_pb(lp) for lp in msg.prompt_logprobs),
    )
