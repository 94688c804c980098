"""The scheduler's performance model: table interpolation, the profiler's JSON contract, the iteration shapes, online
correction, and the analytic model of published hardware (the composition rules: test_cost_model_composition)."""

import json

import pytest

from apex_serve.measurement import TABLE_VERSION
from apex_serve.types import ExecutionMode, StepTimings
from apex_tools.sim.hardware import A10, T4
from scheduler_service.cost.analytic import AnalyticCostModel, AnalyticCosts, HardwareSpec
from scheduler_service.cost.model import (
    ConstantCostModel,
    ConstantCosts,
    Prediction,
    TableCostModel,
    pipelining_beats_gpu_only,
)
from scheduler_service.cost.shape import IterationShape, ModelShape, SubBatchShape, model_shape_from_config
from scheduler_service.cost.tables import PerformanceTables, Table1D, Table2D

GPU_ONLY, ASYNC, ASYM = ExecutionMode.GPU_ONLY, ExecutionMode.ASYNC_OVERLAP, ExecutionMode.ASYM_PIPELINE

LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "torch_dtype": "float16", "model_type": "llama",
}
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16", "model_type": "llama",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_type": "llama3"},
}

# A tiny model whose derived numbers are easy to check by hand:
#   qkv params = 64 * (4 + 2 * 2) * 16 = 8192; layer params = 8192 + 4096 (O) + 24576 (MLP) + 128 (norms) = 36992
#   bytes per CPU row = 2 * 4 * 4 * 16 (q, o in fp32) + 2 * 2 * 2 * 16 (k, v in fp16) = 640
TINY = ModelShape(num_layers=2, hidden_size=64, intermediate_size=128, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  vocab_size=100)
QKV = 8192 / 36992
COSTS = ConstantCosts(
    lin_ns=1000.0, lin_ns_per_token=10.0, pref_ns_per_token=2.0, gatt_ns_per_kv_token=1.0,
    catt_ns_per_kv_token=5.0, xfer_ns_per_byte=0.5, sync_ns=100.0, step_ns=500.0, step_ns_per_request=20.0,
)


def one(mode: ExecutionMode, **sub_batch: object) -> IterationShape:
    return IterationShape(mode, (SubBatchShape(**sub_batch),))


def components_sum(p: Prediction) -> float:
    return p.linear_ns + p.device_attention_ns + p.staging_ns + p.exposed_wait_ns + p.step_overhead_ns + p.residual_ns


# --- tables ---------------------------------------------------------------------------------------------------------


def test_table1d_is_exact_on_a_line_inside_and_beyond_its_points():
    table = Table1D((1.0, 4.0, 10.0), (8.0, 17.0, 35.0))  # y = 3x + 5
    for x in (1.0, 2.5, 4.0, 7.0, 10.0, 0.0, 20.0):
        assert table(x) == pytest.approx(3 * x + 5)


def test_table1d_interpolates_each_segment_separately():
    table = Table1D((0.0, 10.0, 20.0), (0.0, 10.0, 110.0))
    assert table(5.0) == pytest.approx(5.0)
    assert table(15.0) == pytest.approx(60.0)
    assert table(30.0) == pytest.approx(210.0)  # extrapolated from the last segment


def test_table1d_clamps_negative_extrapolation_at_zero():
    table = Table1D((10.0, 20.0), (10.0, 30.0))  # y = 2x - 10
    assert table(2.0) == 0.0


def test_table1d_with_one_point_is_constant():
    assert Table1D((0.0,), (7.0,))(123.0) == 7.0


def test_table2d_is_exact_on_a_bilinear_surface_inside_and_beyond_its_grid():
    def surface(x: float, y: float) -> float:
        return 2.0 + 3.0 * x + 0.5 * y + 0.1 * x * y

    xs, ys = (1.0, 4.0, 16.0), (100.0, 1000.0, 5000.0)
    table = Table2D(xs, ys, tuple(tuple(surface(x, y) for y in ys) for x in xs))
    for x in (1.0, 2.0, 4.0, 9.0, 16.0, 0.0, 32.0):
        for y in (100.0, 550.0, 1000.0, 3000.0, 5000.0, 0.0, 9000.0):
            assert table(x, y) == pytest.approx(surface(x, y)), (x, y)


def test_table2d_clamps_negative_extrapolation_at_zero():
    table = Table2D((1.0, 2.0), (10.0, 20.0), ((0.0, 10.0), (10.0, 20.0)))  # z = 10 x + y - 20
    assert table(0.0, 0.0) == 0.0


def test_table2d_with_one_point_on_an_axis_is_constant_along_it():
    table = Table2D((4.0,), (0.0, 100.0), ((10.0, 20.0),))
    assert table(1.0, 50.0) == pytest.approx(15.0)
    assert table(99.0, 50.0) == pytest.approx(15.0)


@pytest.mark.parametrize("make", [
    lambda: Table1D((2.0, 1.0), (0.0, 0.0)),
    lambda: Table1D((1.0, 2.0), (0.0,)),
    lambda: Table1D((), ()),
    lambda: Table2D((1.0, 2.0), (1.0,), ((0.0,),)),
    lambda: Table2D((1.0, 1.0), (1.0,), ((0.0,), (0.0,))),
])
def test_malformed_tables_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def tables_json(num_layers: int = 2) -> dict:
    return {
        "version": TABLE_VERSION,
        "key": {"device": "test", "model": "tiny", "dtype": "float16"},
        "num_layers": num_layers,
        "tables": {
            "t_lin": {"xs": [1, 64, 512], "ys": [1010, 1640, 6120]},
            "t_pref": {"xs": [1, 512], "ys": [0, 512], "zs": [[2, 4], [1024, 2048]]},
            "t_gatt": {"xs": [1, 64], "ys": [16, 65536], "zs": [[16, 65536], [16, 65536]]},
            "t_catt": {"xs": [1, 64], "ys": [16, 65536], "zs": [[80, 327680], [80, 327680]]},
            "t_xfer": {"xs": [640, 64000], "ys": [320, 32000]},
            "t_sync": {"xs": [0], "ys": [100]},
            "t_step": {"xs": [1, 64], "ys": [520, 1780]},
        },
    }


def test_performance_tables_json_round_trip_is_lossless():
    data = tables_json()
    tables = PerformanceTables.from_json(json.loads(json.dumps(data)))
    again = PerformanceTables.from_json(json.loads(json.dumps(tables.to_json())))
    assert again == tables
    assert again.key == data["key"]
    assert again.t_gatt(4, 1000) == pytest.approx(1000.0)
    assert again.t_sync(0) == 100.0


@pytest.mark.parametrize("name", ["t_lin", "t_pref", "t_gatt", "t_catt", "t_xfer", "t_sync", "t_step"])
def test_performance_tables_missing_table_is_named(name):
    data = tables_json()
    del data["tables"][name]
    with pytest.raises(ValueError, match=f"tables.{name}: missing"):
        PerformanceTables.from_json(data)


@pytest.mark.parametrize(("name", "bad"), [
    ("t_gatt", {"xs": [1, 64], "ys": [16, 65536], "zs": [[16, 65536]]}),
    ("t_catt", {"xs": [1, 64], "ys": [16, 65536]}),
    ("t_lin", {"xs": [64, 1], "ys": [1, 2]}),
    ("t_xfer", {"xs": [1, 2], "ys": [1]}),
])
def test_performance_tables_malformed_table_is_named(name, bad):
    data = tables_json()
    data["tables"][name] = bad
    with pytest.raises(ValueError, match=f"tables.{name}"):
        PerformanceTables.from_json(data)


@pytest.mark.parametrize(("field", "value"), [("version", 1), ("num_layers", "8"), ("num_layers", 0)])
def test_performance_tables_bad_header_is_named(field, value):
    data = tables_json()
    data[field] = value
    with pytest.raises(ValueError, match=field):
        PerformanceTables.from_json(data)


# --- model shapes ---------------------------------------------------------------------------------------------------


def test_model_shape_of_llama2_7b_config():
    shape = model_shape_from_config(LLAMA2_7B_CONFIG)
    assert (shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim) == (32, 32, 32, 128)
    assert shape.weight_bytes_per_param == 2 and shape.kv_bytes_per_element == 2
    assert shape.layer_params == 4096 * 3 * 4096 + 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    total = shape.num_layers * shape.layer_params + shape.head_params + shape.vocab_size * shape.hidden_size
    assert total == pytest.approx(6.74e9, rel=0.01)  # "7B"
    assert shape.bytes_per_cpu_row == 2 * 4 * 4096 + 2 * 2 * 4096


def test_model_shape_of_llama31_8b_config_has_grouped_kv_heads():
    shape = model_shape_from_config(LLAMA31_8B_CONFIG)
    assert (shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size) == (32, 8, 128, 128256)
    assert shape.qkv_params == 4096 * (32 + 2 * 8) * 128
    assert shape.kv_bytes_per_token == 2 * 2 * 8 * 128
    assert model_shape_from_config(LLAMA31_8B_CONFIG, kv_bytes_per_element=4).kv_bytes_per_element == 4


def test_model_shape_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="torch_dtype"):
        model_shape_from_config({**LLAMA2_7B_CONFIG, "torch_dtype": "int8"})


# --- shapes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: one(GPU_ONLY, gpu_rows=1, gpu_kv_tokens=5, cpu_rows=1, cpu_kv_tokens=5),  # gpu_only has no CPU rows
    lambda: IterationShape(ASYNC, (SubBatchShape(gpu_rows=1, gpu_kv_tokens=1),) * 2),
    lambda: IterationShape(ASYM, (SubBatchShape(gpu_rows=1, gpu_kv_tokens=1),) * 3),
    lambda: IterationShape(ASYM, ()),
    lambda: SubBatchShape(gpu_rows=2, gpu_kv_tokens=1),  # every row holds at least its current token
    lambda: SubBatchShape(cpu_kv_tokens=3),
    lambda: SubBatchShape(),
    lambda: SubBatchShape(prefill_lens=(0,)),
])
def test_inconsistent_iteration_shapes_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_iteration_shape_counts_requests_and_tokens_over_sub_batches():
    shape = IterationShape(ASYM, (
        SubBatchShape(prefill_lens=(10, 5), gpu_rows=2, gpu_kv_tokens=20),
        SubBatchShape(cpu_rows=3, cpu_kv_tokens=30),
    ))
    assert shape.num_requests == 7
    assert shape.num_tokens == 20


# --- composition (per layout: test_cost_model_composition) ----------------------------------------------------


def test_prediction_total_is_the_sum_of_its_serial_parts():
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY)
    shapes = [
        one(GPU_ONLY, prefill_lens=(300, 20), gpu_rows=8, gpu_kv_tokens=4000),
        one(ASYNC, gpu_rows=8, gpu_kv_tokens=4000, cpu_rows=16, cpu_kv_tokens=20000),
        IterationShape(ASYM, (SubBatchShape(gpu_rows=4, gpu_kv_tokens=900, cpu_rows=8, cpu_kv_tokens=9000),) * 2),
    ]
    for shape in shapes:
        p = model.predict(shape)
        assert p.total_ns > 0
        assert p.total_ns == pytest.approx(components_sum(p)), shape.mode


# --- online correction ----------------------------------------------------------------------------------------------


def slower(model: TableCostModel, shape: IterationShape, ratio: float) -> StepTimings:
    """Timings of a step that ran `ratio` times as long as the tables say, every subtask alike."""
    raw = model.predict_raw(shape)
    return StepTimings(
        total_ns=round(ratio * raw.total_ns),
        forward_ns=round(ratio * (raw.total_ns - raw.step_overhead_ns)),
        device_linear_ns=round(ratio * raw.linear_ns / model.model.layers_linear_share),
        device_attention_ns=round(ratio * raw.device_attention_ns),
        staging_ns=round(ratio * raw.staging_ns),
        cpu_attention_ns=round(ratio * raw.cpu_attention_ns),
    )


ASYNC_SHAPES = [
    one(ASYNC, gpu_rows=8, gpu_kv_tokens=4000, cpu_rows=4, cpu_kv_tokens=2000),
    one(ASYNC, prefill_lens=(200,), gpu_rows=6, gpu_kv_tokens=3000, cpu_rows=8, cpu_kv_tokens=6000),
    one(ASYNC, gpu_rows=16, gpu_kv_tokens=9000, cpu_rows=2, cpu_kv_tokens=800),
]


def test_online_correction_converges_when_every_step_runs_30_percent_slow():
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY, alpha=0.1)
    for i in range(50):
        shape = ASYNC_SHAPES[i % len(ASYNC_SHAPES)]
        model.observe(shape, model.predict(shape), slower(model, shape, 1.3))
    stats = model.error_stats()[ASYNC]
    assert stats.count == 50
    assert stats.raw_mape == pytest.approx(0.3 / 1.3, rel=1e-3)  # the tables stay 30% optimistic
    assert stats.corrected_mape < 0.02
    assert abs(stats.last_corrected_error) < 0.01
    assert model.factors.linear == pytest.approx(1.3, rel=1e-3)
    assert model.factors.cpu_attention == pytest.approx(1.3, rel=1e-3)
    for shape in ASYNC_SHAPES:
        assert model.predict(shape).total_ns == pytest.approx(1.3 * model.predict_raw(shape).total_ns, rel=0.02)


def test_online_correction_follows_a_change_at_the_ema_rate():
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY, alpha=0.1)
    shape = ASYNC_SHAPES[0]
    for _ in range(50):
        model.observe(shape, model.predict(shape), slower(model, shape, 1.0))
    model.observe(shape, model.predict(shape), slower(model, shape, 2.0))
    assert model.factors.linear == pytest.approx(1.1, rel=1e-3)  # one step at weight alpha, not a mean of 51
    for _ in range(60):
        model.observe(shape, model.predict(shape), slower(model, shape, 2.0))
    assert model.predict(shape).total_ns == pytest.approx(2.0 * model.predict_raw(shape).total_ns, rel=0.01)


def test_online_correction_fits_a_fixed_cost_the_tables_miss_for_short_and_long_steps_alike():
    """Steps pay 2 ms of linear-layer overhead on top of the tables: one ratio cannot fit a short decode step and a
    long prefill step at once; the affine fit does."""
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY, alpha=0.1)
    short, long = one(GPU_ONLY, gpu_rows=2, gpu_kv_tokens=100), one(GPU_ONLY, prefill_lens=(800,), gpu_rows=2,
                                                                      gpu_kv_tokens=100)

    def measured(shape: IterationShape) -> StepTimings:
        raw = model.predict_raw(shape)
        linear = raw.linear_ns + 2e6
        return StepTimings(total_ns=round(raw.total_ns + 2e6), device_attention_ns=round(raw.device_attention_ns),
                           device_linear_ns=round(linear / model.model.layers_linear_share))

    for i in range(60):
        shape = (short, long)[i % 2]
        model.observe(shape, model.predict(shape), measured(shape))
    for shape in (short, long):
        assert model.predict(shape).total_ns == pytest.approx(measured(shape).total_ns, rel=0.01)


def test_residual_factor_absorbs_what_no_subtask_measures_per_mode():
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY)
    shape = one(GPU_ONLY, gpu_rows=8, gpu_kv_tokens=4000)
    timings = slower(model, shape, 1.0)
    timings = StepTimings(**{**timings.__dict__, "total_ns": timings.total_ns + 10_000})  # say, slow sampling
    for _ in range(20):
        model.observe(shape, model.predict(shape), timings)
    assert model.factors.linear == pytest.approx(1.0, rel=1e-3)
    assert model.factors.device_attention == pytest.approx(1.0, rel=1e-3)
    assert model.residual_factor(GPU_ONLY) > 1.0
    assert model.predict(shape).total_ns == pytest.approx(timings.total_ns, rel=1e-6)
    assert model.residual_factor(ASYNC) == model.residual_factor(GPU_ONLY)  # borrowed until ASYNC runs
    async_shape = one(ASYNC, gpu_rows=8, gpu_kv_tokens=4000, cpu_rows=2, cpu_kv_tokens=500)
    exact = slower(model, async_shape, 1.0)
    for _ in range(20):
        model.observe(async_shape, model.predict(async_shape), exact)
    assert model.residual_factor(ASYNC) == pytest.approx(1.0, rel=1e-3)  # then its own
    assert model.residual_factor(GPU_ONLY) > 1.0


def test_subtasks_a_step_did_not_run_keep_their_factor():
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY)
    shape = ASYNC_SHAPES[0]
    model.observe(shape, model.predict(shape), slower(model, shape, 1.5))
    gpu_only = one(GPU_ONLY, gpu_rows=8, gpu_kv_tokens=4000)
    for _ in range(10):
        model.observe(gpu_only, model.predict(gpu_only), slower(model, gpu_only, 1.0))
    assert model.factors.cpu_attention == pytest.approx(1.5)
    assert model.factors.staging == pytest.approx(1.5)
    assert model.factors.linear < 1.5


def test_error_stats_are_kept_per_mode_and_skip_empty_timings():
    model = ConstantCostModel(COSTS, TINY)
    assert model.error_stats() == {}
    shape = one(GPU_ONLY, gpu_rows=1, gpu_kv_tokens=10)
    model.observe(shape, model.predict(shape), StepTimings())
    assert model.error_stats() == {}
    predicted = model.predict(shape)
    model.observe(shape, predicted, StepTimings(total_ns=round(predicted.total_ns / 2)))
    stats = model.error_stats()
    assert list(stats) == [GPU_ONLY]
    assert stats[GPU_ONLY].last_raw_error == pytest.approx(1.0, rel=1e-3)  # predicted twice what ran
    assert stats[GPU_ONLY].corrected_mape == pytest.approx(1.0, rel=1e-3)


def test_prediction_before_any_observation_is_the_raw_one():
    model = TableCostModel(PerformanceTables.from_json(tables_json()), TINY)
    for shape in ASYNC_SHAPES:
        assert model.predict(shape) == model.predict_raw(shape)


def test_table_cost_model_rejects_tables_of_another_depth():
    with pytest.raises(ValueError, match="num_layers"):
        TableCostModel(PerformanceTables.from_json(tables_json(num_layers=8)), TINY)


# --- analytic model and the paper's condition -----------------------------------------------------------------------


def decode_batch(rows: int, context: int) -> IterationShape:
    return one(GPU_ONLY, gpu_rows=rows, gpu_kv_tokens=rows * context)


def test_analytic_llama2_7b_decode_on_t4_is_bound_by_streaming_the_weights():
    shape = model_shape_from_config(LLAMA2_7B_CONFIG)
    p = AnalyticCostModel(T4, shape).predict(decode_batch(8, 512))
    streaming = 13.5e9 / 320e9 * 1e9  # ns
    assert 0.5 * streaming < p.total_ns < 1.5 * streaming
    assert p.linear_ns > 5 * p.device_attention_ns


def test_analytic_a10_decodes_faster_than_t4():
    shape = model_shape_from_config(LLAMA31_8B_CONFIG)
    batch = decode_batch(16, 1024)
    t4, a10 = AnalyticCostModel(T4, shape).predict(batch), AnalyticCostModel(A10, shape).predict(batch)
    assert a10.total_ns < t4.total_ns


def test_analytic_linear_turns_compute_bound_for_long_prefill():
    costs = AnalyticCosts(T4, model_shape_from_config(LLAMA2_7B_CONFIG))
    assert costs.t_lin(1) == pytest.approx(costs.t_lin(64))  # weight streaming: batch is free
    assert costs.t_lin(4096) > 5 * costs.t_lin(1)


def test_analytic_cpu_attention_is_slower_than_gpu_attention_by_the_bandwidth_ratio():
    costs = AnalyticCosts(T4, model_shape_from_config(LLAMA2_7B_CONFIG))
    gpu = costs.t_gatt(8, 8 * 2048) - T4.launch_overhead_ns
    cpu = costs.t_catt(8, 8 * 2048)
    assert cpu / gpu == pytest.approx(T4.hbm_bytes_per_s / (T4.host_dram_bytes_per_s * T4.cpu_attention_efficiency))


def test_hardware_spec_rejects_efficiency_outside_unit_interval():
    with pytest.raises(ValueError, match="cpu_attention_efficiency"):
        HardwareSpec("x", 1e9, 1e12, 1e9, 1e9, cpu_attention_efficiency=1.5, launch_overhead_ns=0.0)


def test_pipelining_condition_boundary():
    # T_lin = T_gatt: pipelining pays only while the GPU's attention is under 2 + 3 + 1 = 6 times the CPU's
    assert pipelining_beats_gpu_only(1.0, 1.0, n_g=5.9, n_c=1.0)
    assert not pipelining_beats_gpu_only(1.0, 1.0, n_g=6.1, n_c=1.0)
    # linear-heavy layers leave more room to hide CPU attention
    assert pipelining_beats_gpu_only(4.0, 1.0, n_g=11.0, n_c=1.0)  # bound 8 + 3 + 0.25
    with pytest.raises(ValueError):
        pipelining_beats_gpu_only(0.0, 1.0, 1.0, 1.0)


def attention_throughputs(hardware: HardwareSpec, rows: int, context: int) -> tuple[float, float, float, float]:
    """T_lin, T_gatt of a decode batch and the GPU's and CPU's attention throughput (KV tokens per ns)."""
    costs = AnalyticCosts(hardware, model_shape_from_config(LLAMA2_7B_CONFIG))
    kv = rows * context
    return costs.t_lin(rows), costs.t_gatt(rows, kv), kv / costs.t_gatt(rows, kv), kv / costs.t_catt(rows, kv)


@pytest.mark.parametrize(("rows", "context"), [(8, 2048), (16, 1024), (64, 256)])
def test_pipelining_does_not_beat_gpu_only_for_llama2_7b_decode_on_a10_with_its_kv_pool_full(rows, context):
    # 24 GB less 13.5 GB of weights leaves about 8 GB of KV: 16k tokens of LLaMA-2-7B
    t_lin, t_gatt, n_g, n_c = attention_throughputs(A10, rows, context)
    assert n_g / n_c > 10  # 600 GB/s against 8 cores' 69 GB/s at the kernel's 0.78
    assert not pipelining_beats_gpu_only(t_lin, t_gatt, n_g, n_c)


def test_pipelining_beats_gpu_only_with_a_host_as_fast_as_the_gpu():
    fast_host = HardwareSpec("fast-host", 320e9, 65e12, 12e9, host_dram_bytes_per_s=320e9,
                             cpu_attention_efficiency=0.5, launch_overhead_ns=10_000.0)
    assert pipelining_beats_gpu_only(*attention_throughputs(fast_host, 8, 2048))
