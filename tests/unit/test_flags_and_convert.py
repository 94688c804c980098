"""Config flags derived from dataclasses, and the protobuf edge round trip."""

import dataclasses

import pytest

from apex_serve import convert
from apex_serve.errors import InvalidArgument
from apex_serve.flags import field_help, option, parse_config
from apex_serve.types import (
    CachedRequestData,
    ExecutionMode,
    NewRequestData,
    Placement,
    SamplingParams,
    StepOutput,
    StepPlan,
    StepTimings,
    Subtask,
    SubtaskKind,
    SwapData,
    TokenLogprob,
)
from apex_serve.v1 import common_pb2, gpu_worker_pb2, scheduler_pb2
from apex_tools.cli import build_parser
from apex_tools.launcher import StackConfig
from cpu_attention_worker.config import CpuAttentionConfig
from gateway.config import GatewayConfig
from gpu_worker.config import GpuWorkerConfig
from profiler_service.config import ProfilerConfig
from scheduler_service.config import SchedulerConfig


def test_flags_mirror_config_fields_and_defaults() -> None:
    config = parse_config(StackConfig, ["--port", "6000", "--num-kv-blocks", "7"], "test")
    assert config.port == 6000 and config.num_kv_blocks == 7
    assert config.dtype == StackConfig.dtype
    assert parse_config(StackConfig, [], "test") == StackConfig()


def test_invalid_config_flag_names_the_field() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_config(StackConfig, ["--port", "70000"], "test")


def test_absent_sampling_fields_take_defaults_and_present_ones_are_kept() -> None:
    assert convert.sampling_from_pb(common_pb2.SamplingParams()) == SamplingParams()
    msg = common_pb2.SamplingParams(temperature=0.0, seed=0, top_k=3)
    params = convert.sampling_from_pb(msg)
    assert params.temperature == 0.0 and params.seed == 0 and params.top_k == 3


@pytest.mark.parametrize(
    "field,kwargs",
    [("temperature", dict(temperature=-1.0)), ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.01)),
     ("top_k", dict(top_k=-2)), ("max_tokens", dict(max_tokens=0)), ("min_p", dict(min_p=5.0)),
     ("truncate_prompt_tokens", dict(truncate_prompt_tokens=0)), ("bad_words", dict(bad_words=[" "]))],
)
def test_out_of_range_sampling_raises_invalid_argument_naming_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidArgument) as err:
        convert.sampling_from_pb(common_pb2.SamplingParams(**kwargs))
    assert err.value.field == field


def test_plan_and_step_output_survive_the_protobuf_round_trip() -> None:
    plan = StepPlan(
        step_id=5,
        new_requests=(
            NewRequestData("a", (1, 2, 3), SamplingParams(temperature=0.0, seed=9), (4, 0), 1),
            NewRequestData("e", (5,), SamplingParams(), (2,), 0, Placement.CPU, 1),
        ),
        cached_requests=(CachedRequestData("b", (7,)), CachedRequestData("c", sub_batch=1)),
        freed_request_ids=("d",),
        mode=ExecutionMode.ASYM_PIPELINE,
        swap_out=(SwapData("b", (3, 4)),),
        swap_in=(SwapData("c", (8,)),),
    )
    assert convert.plan_from_pb(convert.plan_to_pb(plan)) == plan
    out = StepOutput(5, {"a": 3, "b": 257}, StepTimings(*range(1, 11)))
    assert convert.step_output_from_pb(convert.step_output_to_pb(out)) == out


def test_every_sampling_field_survives_the_protobuf_round_trip() -> None:
    params = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=5, seed=3, max_tokens=20, stop_token_ids=(1, 2), ignore_eos=True,
        min_tokens=4, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, logprobs=0, min_p=0.1,
        allowed_token_ids=(4, 9), bad_words=("no",), bad_words_token_ids=((110, 111), (7,)), skip_special_tokens=False,
        truncate_prompt_tokens=3, prompt_logprobs=2, structured_grammar='start: "a"',
    )
    assert [f.name for f in dataclasses.fields(params) if getattr(params, f.name) == f.default] == []
    assert convert.sampling_from_pb(convert.sampling_to_pb(params)) == params


def test_step_output_logprobs_survive_the_protobuf_round_trip() -> None:
    out = StepOutput(1, {"a": 3, "b": 4}, logprobs={"a": TokenLogprob(3, -0.25, ((3, -0.25), (9, -2.0)))},
                     prompt_logprobs={"a": (TokenLogprob(5, -1.5, ((2, -0.5),)), TokenLogprob(6, -0.75))})
    assert convert.step_output_from_pb(convert.step_output_to_pb(out)) == out


def test_unset_enums_read_as_their_defaults() -> None:
    plan = convert.plan_from_pb(gpu_worker_pb2.StepRequest(step_id=1, new_requests=[gpu_worker_pb2.NewRequest()]))
    assert plan.mode is ExecutionMode.GPU_ONLY
    assert plan.new_requests[0].placement is Placement.GPU
    assert convert.finish_reason_from_pb(common_pb2.FINISH_REASON_UNSPECIFIED) is None


def test_an_unknown_execution_mode_raises_invalid_argument_naming_the_field_and_value() -> None:
    with pytest.raises(InvalidArgument, match="ExecutionMode 7 is not one of") as err:
        convert.plan_from_pb(gpu_worker_pb2.StepRequest(step_id=1, mode=7))
    assert err.value.field == "mode"


def test_an_unknown_placement_raises_invalid_argument_naming_the_request() -> None:
    msg = gpu_worker_pb2.StepRequest(
        step_id=1, new_requests=[gpu_worker_pb2.NewRequest(placement=common_pb2.PLACEMENT_CPU),
                                 gpu_worker_pb2.NewRequest(placement=9)],
    )
    with pytest.raises(InvalidArgument, match="Placement 9 is not one of") as err:
        convert.plan_from_pb(msg)
    assert err.value.field == "new_requests[1].placement"


def test_an_unknown_finish_reason_raises_invalid_argument_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match="FinishReason 8 is not one of") as err:
        convert.request_output_from_pb("a", scheduler_pb2.SubmitResponse(finished=True, finish_reason=8))
    assert err.value.field == "finish_reason"


@pytest.mark.parametrize("kind,label", [(gpu_worker_pb2.SUBTASK_KIND_UNSPECIFIED, "SUBTASK_KIND_UNSPECIFIED"),
                                        (11, "11")])
def test_an_unset_or_unknown_subtask_kind_raises_invalid_argument_naming_the_subtask(kind: int, label: str) -> None:
    msg = convert.step_output_to_pb(
        StepOutput(1, {}, subtasks=(Subtask(SubtaskKind.STAGING, 0, 0, 1, 2), Subtask(SubtaskKind.STAGING, 1, 0, 3, 4)))
    )
    msg.subtasks[1].kind = kind
    with pytest.raises(InvalidArgument, match=f"SubtaskKind {label} is not one of") as err:
        convert.step_output_from_pb(msg)
    assert err.value.field == "subtasks[1].kind"


def test_submit_request_carries_the_prompt_and_sampling() -> None:
    sampling = SamplingParams(temperature=0.5, max_tokens=7, seed=2)
    msg = convert.submit_request_to_pb("r", [1, 2, 3], sampling)
    assert (msg.request_id, list(msg.prompt_token_ids)) == ("r", [1, 2, 3])
    assert convert.sampling_from_pb(msg.sampling) == sampling


def test_measure_request_survives_the_protobuf_round_trip() -> None:
    msg = convert.measure_request_to_pb("t_gatt", [(1, 16), (4, 64)], warmup=1, repeats=3)
    assert (msg.table, msg.warmup, msg.repeats) == ("t_gatt", 1, 3)
    assert convert.measure_points_from_pb(msg) == [(1, 16), (4, 64)]


SERVICE_CONFIGS = [GatewayConfig, SchedulerConfig, GpuWorkerConfig, CpuAttentionConfig, ProfilerConfig]


@pytest.mark.parametrize("cls", [*SERVICE_CONFIGS, StackConfig], ids=lambda cls: cls.__name__)
def test_every_config_field_carries_a_help_text(cls: type) -> None:
    assert [f.name for f in dataclasses.fields(cls) if not field_help(f).strip()] == []


def _help_lines(help_text: str) -> str:
    return " ".join(help_text.split())


def test_up_help_gives_each_option_its_help_and_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["up", "--help"])
    assert done.value.code == 0
    out = _help_lines(capsys.readouterr().out)
    for f in dataclasses.fields(StackConfig):
        assert f"--{f.name.replace('_', '-')}" in out
        assert _help_lines(field_help(f)) in out, f.name
        assert f"(default: {'empty' if f.default == '' else f.default})" in out, f.name


@pytest.mark.parametrize("cls", SERVICE_CONFIGS, ids=lambda cls: cls.__name__)
def test_service_help_gives_each_flag_its_help(
    cls: type, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as done:
        parse_config(cls, ["--help"], "test")
    assert done.value.code == 0
    out = _help_lines(capsys.readouterr().out)
    assert all(_help_lines(field_help(f)) in out for f in dataclasses.fields(cls))


def test_a_help_text_with_a_percent_sign_is_printed_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    @dataclasses.dataclass(frozen=True)
    class Config:
        share: float = option(0.5, help="fraction of the pool, not a % of it")

    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"], "test")
    assert "not a % of it (default: 0.5)" in capsys.readouterr().out
