"""The cost model's composition rules per mode and overlap layout, with ConstantCosts whose every number can be
added up by hand (the rules: scheduler_service.cost.model's docstring).

TINY: t_lin(n) = 1000 + 10 n per call, t_pref = 2 per prefill token, t_gatt = 1 per KV token,
t_catt = 5 per KV token, t_xfer = 0.5 per byte (640 bytes per CPU row: 320 ns), t_sync = 100, t_step = 500 + 20 per
request, 2 layers, QKV = 8192 / 36992 of a layer's weights."""

import pytest

from apex_serve.types import ExecutionMode, OverlapLayout, StepTimings
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts, sub_batch_costs
from scheduler_service.cost.shape import IterationShape, ModelShape, SubBatchShape

GPU_ONLY, ASYNC, ASYM = ExecutionMode.GPU_ONLY, ExecutionMode.ASYNC_OVERLAP, ExecutionMode.ASYM_PIPELINE
FUSED, SPLIT = OverlapLayout.FUSED, OverlapLayout.SPLIT
TINY = ModelShape(num_layers=2, hidden_size=64, intermediate_size=128, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  vocab_size=100)  # qkv params 64 * (4 + 2 * 2) * 16 = 8192; layer params 36992; 640 B per CPU row
QKV = 8192 / 36992
COSTS = ConstantCosts(
    lin_ns=1000.0, lin_ns_per_token=10.0, pref_ns_per_token=2.0, gatt_ns_per_kv_token=1.0,
    catt_ns_per_kv_token=5.0, xfer_ns_per_byte=0.5, sync_ns=100.0, step_ns=500.0, step_ns_per_request=20.0,
)
DECODE = {"gpu_rows": 4, "gpu_kv_tokens": 400, "cpu_rows": 2}  # gatt 400, staging 2 * 320, 6 rows
MIXED = {"prefill_lens": (100,), "gpu_rows": 4, "gpu_kv_tokens": 400, "cpu_rows": 2, "cpu_kv_tokens": 400}


def one(mode: ExecutionMode, layout: OverlapLayout = FUSED, **sub_batch: object) -> IterationShape:
    return IterationShape(mode, (SubBatchShape(**sub_batch),), layout)


def predict(shape: IterationShape):
    return ConstantCostModel(COSTS, TINY).predict(shape)


def test_gpu_only_layer_is_linear_plus_prefill_plus_gpu_attention_with_a_trimmed_last_layer():
    p = predict(one(GPU_ONLY, prefill_lens=(10,), gpu_rows=3, gpu_kv_tokens=30))
    lin, pref, gatt, step = 1000 + 10 * 13, 2 * 10, 30, 500 + 20 * 4
    last_layer_saving = (1 - QKV) * (lin - (1000 + 10 * 4))  # O-proj and MLP only for the 4 requests' last tokens
    assert p.linear_ns == pytest.approx(2 * lin - last_layer_saving)
    assert p.device_attention_ns == pytest.approx(2 * (pref + gatt))
    assert p.step_overhead_ns == pytest.approx(step)
    assert p.staging_ns == p.cpu_attention_ns == p.exposed_wait_ns == p.sync_ns == 0
    assert p.total_ns == pytest.approx(2 * (lin + pref + gatt) - last_layer_saving + step)


def test_fused_decode_streams_the_weights_once_and_its_window_is_the_gpu_rows_attention():
    p = predict(one(ASYNC, FUSED, cpu_kv_tokens=40, **DECODE))  # catt 200 + sync 100 under the window of 400
    assert p.linear_ns == pytest.approx(2 * 1060)
    assert p.exposed_wait_ns == 0
    assert (p.cpu_attention_ns, p.sync_ns, p.staging_ns) == pytest.approx((2 * 200, 2 * 100, 2 * 640))
    assert p.total_ns == pytest.approx(2 * (1060 + 400 + 640) + 500 + 20 * 6)
    beyond = predict(one(ASYNC, FUSED, cpu_kv_tokens=100, **DECODE))  # 500 + 100 against 400: 200 exposed
    assert beyond.exposed_wait_ns == pytest.approx(2 * 200)
    assert beyond.total_ns == pytest.approx(2 * (1060 + 400 + 640 + 200) + 620)


def test_split_decode_pays_a_second_qkv_pass_that_joins_the_window():
    p = predict(one(ASYNC, SPLIT, cpu_kv_tokens=100, **DECODE))
    linear = QKV * ((1000 + 20) + (1000 + 40)) + (1 - QKV) * (1000 + 60)  # QKV of CPU rows, of the others; O + MLP
    assert linear == pytest.approx(1060 + QKV * 1000)  # one more pass over the QKV weights
    assert p.linear_ns == pytest.approx(2 * linear)
    window = 400 + QKV * 1040
    assert 500 + 100 < window and p.exposed_wait_ns == 0  # hidden by the others' QKV, where FUSED exposes 200
    assert p.total_ns == pytest.approx(2 * (linear + 400 + 640) + 620)
    fused = predict(one(ASYNC, FUSED, cpu_kv_tokens=100, **DECODE))
    assert fused.total_ns < p.total_ns  # 200 exposed per layer is less than the second pass's 221.5


def test_fused_with_prefill_rows_exposes_what_the_attention_alone_cannot_hide():
    p = predict(one(ASYNC, FUSED, **MIXED))
    lin, att = 1000 + 10 * 106, 2 * 100 + 400
    saving = (1 - QKV) * (lin - (1000 + 10 * 7))  # the last layer's O-proj and MLP over the 7 requests
    assert p.linear_ns == pytest.approx(2 * lin - saving)
    assert p.exposed_wait_ns == pytest.approx(2 * (2000 + 100 - att))
    assert p.total_ns == pytest.approx(2 * (lin + att + 640 + 1500) - saving + 500 + 20 * 7)


def test_split_with_prefill_rows_runs_their_o_proj_and_mlp_in_the_window_for_a_second_pass_of_every_weight():
    p = predict(one(ASYNC, SPLIT, **MIXED))
    linear = QKV * ((1000 + 20) + (1000 + 1040)) + (1 - QKV) * ((1000 + 1000) + (1000 + 60))
    assert linear == pytest.approx(1060 + 1000 + 1000)  # the prefill and decode rows' calls: one more of each part
    saving = (1 - QKV) * ((1000 + 1000) - (1000 + 10))  # the last layer's prefill O-proj and MLP: its last token
    assert p.linear_ns == pytest.approx(2 * linear - saving)
    window = 600 + QKV * (1000 + 1040) + (1 - QKV) * (1000 + 1000)
    assert 2100 < window and p.exposed_wait_ns == 0
    assert p.total_ns == pytest.approx(2 * (linear + 600 + 640) - saving + 640)
    assert p.total_ns < predict(one(ASYNC, FUSED, **MIXED)).total_ns  # here the wider window pays for the pass


def test_sub_batch_costs_name_each_layouts_window_and_exposed_wait():
    sb = SubBatchShape(cpu_kv_tokens=100, **DECODE)
    fused, split = (sub_batch_costs(COSTS, TINY, sb, layout) for layout in (FUSED, SPLIT))
    assert (fused.window, fused.exposed_wait) == pytest.approx((400, 200))
    assert (split.window, split.exposed_wait) == pytest.approx((400 + QKV * 1040, 0))
    assert split.device - fused.device == pytest.approx(QKV * 1000)


@pytest.mark.parametrize("shape", [DECODE | {"cpu_kv_tokens": 100}, MIXED, {"cpu_rows": 3, "cpu_kv_tokens": 30,
                                                                          "prefill_lens": (50, 8)}])
def test_split_costs_more_linear_time_than_fused_for_the_same_rows(shape):
    fused, split = predict(one(ASYNC, FUSED, **shape)), predict(one(ASYNC, SPLIT, **shape))
    assert split.linear_ns > fused.linear_ns


def test_layout_is_moot_without_cpu_rows_or_without_other_rows():
    no_cpu = {"prefill_lens": (30,), "gpu_rows": 4, "gpu_kv_tokens": 400}
    assert predict(one(ASYNC, SPLIT, **no_cpu)) == predict(one(ASYNC, FUSED, **no_cpu))
    cpu_only = {"cpu_rows": 3, "cpu_kv_tokens": 300}  # SPLIT's QKV of the others is no call at all
    assert predict(one(ASYNC, SPLIT, **cpu_only)) == pytest.approx(predict(one(ASYNC, FUSED, **cpu_only)))


HALF = SubBatchShape(gpu_rows=2, gpu_kv_tokens=100, cpu_rows=1, cpu_kv_tokens=10)  # catt 50 + sync 100


def test_asym_pipeline_fused_streams_the_weights_once_per_sub_batch():
    pipelined = predict(IterationShape(ASYM, (HALF, HALF), FUSED))
    overlapped = predict(one(ASYNC, FUSED, gpu_rows=4, gpu_kv_tokens=200, cpu_rows=2, cpu_kv_tokens=20))
    assert pipelined.linear_ns == pytest.approx(2 * 2 * (1000 + 30))
    assert pipelined.linear_ns - overlapped.linear_ns == pytest.approx(2 * 1000)  # one more pass of the fixed part
    assert pipelined.exposed_wait_ns == 0  # 150 ns of CPU work per sub-batch hides behind the other's 1450
    assert pipelined.total_ns == pytest.approx(2 * 2 * (1030 + 100 + 320) + 500 + 20 * 6)


def test_asym_pipeline_split_pays_a_second_qkv_pass_in_each_sub_batch():
    p = predict(IterationShape(ASYM, (HALF, HALF), SPLIT))
    per_sub_batch = QKV * ((1000 + 10) + (1000 + 20)) + (1 - QKV) * (1000 + 30)
    assert per_sub_batch == pytest.approx(1030 + QKV * 1000)
    assert p.linear_ns == pytest.approx(2 * 2 * per_sub_batch)
    assert p.total_ns == pytest.approx(2 * 2 * (per_sub_batch + 100 + 320) + 620)


@pytest.mark.parametrize("layout", [FUSED, SPLIT])
def test_asym_pipeline_exposes_each_sub_batchs_cpu_attention_beyond_the_others_device_work(layout):
    a = SubBatchShape(gpu_rows=2, gpu_kv_tokens=100, cpu_rows=1, cpu_kv_tokens=1000)  # catt 5000
    b = SubBatchShape(gpu_rows=1, gpu_kv_tokens=50, cpu_rows=1, cpu_kv_tokens=100)  # catt 500
    p = predict(IterationShape(ASYM, (a, b), layout))
    second_pass = QKV * 1000 if layout is SPLIT else 0.0
    dev_a, dev_b = 1030 + 100 + 320 + second_pass, 1020 + 50 + 320 + second_pass
    exposed = max(0, 500 + 100 - dev_a) + max(0, 5000 + 100 - dev_b)
    assert exposed == pytest.approx(5100 - dev_b)
    assert p.exposed_wait_ns == pytest.approx(2 * exposed)
    assert p.total_ns == pytest.approx(2 * (dev_a + dev_b + exposed) + 500 + 20 * 5)


@pytest.mark.parametrize("layout", [FUSED, SPLIT])
def test_asym_pipeline_with_one_sub_batch_costs_as_async_overlap(layout):
    assert predict(one(ASYM, layout, **MIXED)) == predict(one(ASYNC, layout, **MIXED))


# --- online correction per layout ---------------------------------------------------------------------------------


def executed(model: ConstantCostModel, shape: IterationShape, extra_ns: float = 0.0) -> StepTimings:
    """Timings of a step that ran as priced (the second weight pass of SPLIT in its device_linear), plus extra_ns
    no subtask accounts for."""
    raw = model.predict_raw(shape)
    return StepTimings(
        total_ns=round(raw.total_ns + extra_ns),
        forward_ns=round(raw.total_ns - raw.step_overhead_ns),
        device_linear_ns=round(raw.linear_ns / model.model.layers_linear_share),
        device_attention_ns=round(raw.device_attention_ns),
        staging_ns=round(raw.staging_ns),
        cpu_attention_ns=round(raw.cpu_attention_ns),
    )


def test_split_steps_that_ran_as_priced_leave_every_factor_at_one():
    model = ConstantCostModel(COSTS, TINY)
    shape = one(ASYNC, SPLIT, **MIXED)
    for _ in range(10):
        model.observe(shape, model.predict(shape), executed(model, shape))
    assert model.factors.linear == pytest.approx(1.0, rel=1e-3)
    assert model.residual_factor(ASYNC, SPLIT) == pytest.approx(1.0, rel=1e-3)


def test_residual_is_fitted_per_layout_and_an_unseen_layout_borrows_its_modes():
    model = ConstantCostModel(COSTS, TINY)
    split = one(ASYNC, SPLIT, **MIXED)
    for _ in range(20):
        model.observe(split, model.predict(split), executed(model, split, extra_ns=3000))
    assert model.residual_factor(ASYNC, SPLIT) > 1.0
    assert model.residual_factor(ASYNC, FUSED) == model.residual_factor(ASYNC, SPLIT)  # borrowed until FUSED runs
    fused = one(ASYNC, FUSED, **MIXED)
    for _ in range(20):
        model.observe(fused, model.predict(fused), executed(model, fused))
    assert model.residual_factor(ASYNC, FUSED) == pytest.approx(1.0, rel=1e-3)
    assert model.predict(split).total_ns == pytest.approx(model.predict_raw(split).total_ns + 3000, rel=1e-3)


class FixedXferCosts(ConstantCosts):
    """COSTS with a fixed 50 ns per transfer, as a measured t_xfer table has."""

    def t_xfer(self, nbytes: float) -> float:
        return 50.0 + super().t_xfer(nbytes)


def test_staging_is_charged_only_for_transfers_that_happen():
    costs = FixedXferCosts(**vars(COSTS))
    model = ConstantCostModel(costs, TINY)
    assert model.predict(one(GPU_ONLY, prefill_lens=(10,), gpu_rows=3, gpu_kv_tokens=30)).staging_ns == 0
    for layout in (FUSED, SPLIT):  # the CPU rows' q/k/v and o, no prefill context to load
        assert model.predict(one(ASYNC, layout, cpu_kv_tokens=40, **DECODE)).staging_ns == pytest.approx(2 * (50 + 640))
