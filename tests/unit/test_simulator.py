"""The simulator (apex-serve simulate): workloads, setups, the engine driving the real Scheduler, the CLI."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from apex_serve.measurement import TABLE_VERSION
from apex_serve.types import Placement
from apex_tools.sim.cli import main
from apex_tools.sim.engine import Simulation, steady_window
from apex_tools.sim.setups import UnsupportedSetup, profiled_setup, published_setup
from apex_tools.sim.variants import VARIANTS
from apex_tools.sim.workloads import WORKLOADS, SimRequest, WorkloadSpec, fit_to, generate, peak_kv_tokens
from scheduler_service.config import POLICIES, SchedulerConfig


def config(policy: str) -> SchedulerConfig:
    return SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, policy=policy)


@pytest.mark.parametrize("kind", WORKLOADS)
def test_workload_differs_between_seeds_and_repeats_for_one(kind: str) -> None:
    spec = WorkloadSpec(kind, num_requests=300, rate=2.0, seed=7)
    assert generate(spec) == generate(spec)
    if kind != "grid":
        assert generate(spec) != generate(dataclasses.replace(spec, seed=8))


def test_workload_lengths_stay_in_their_documented_ranges() -> None:
    chat, cot, summarize = (generate(WorkloadSpec(kind, 2000)) for kind in ("chat", "cot", "summarize"))
    assert all(4 <= r.prompt_len <= 2048 and 4 <= r.output_len <= 2048 for r in chat)
    assert 150 < np.median([r.prompt_len for r in chat]) < 260
    assert all(16 <= r.prompt_len <= 512 and 1024 <= r.output_len <= 4096 for r in cot)
    assert all(1024 <= r.prompt_len <= 4000 and 16 <= r.output_len <= 256 for r in summarize)
    grid = generate(WorkloadSpec("grid", 5, grid_prompt_len=33, grid_output_len=9))
    assert {(r.prompt_len, r.output_len) for r in grid} == {(33, 9)}


def test_short_cot_fits_a_t4s_llama2_pool_and_osc_has_neos_summarization_moments() -> None:
    pool = published_setup("t4", "llama2-7b", 4096, 256).worker
    short_cot, osc = (generate(WorkloadSpec(kind, 2000)) for kind in ("short-cot", "osc"))
    assert max(peak_kv_tokens(r) for r in short_cot) <= pool.num_kv_blocks * pool.block_size
    assert all(16 <= r.prompt_len <= 256 and 256 <= r.output_len <= 768 for r in short_cot)
    prompts, outputs = np.array([r.prompt_len for r in osc]), np.array([r.output_len for r in osc])
    assert prompts.min() >= 29 and prompts.max() <= 589 and outputs.min() >= 15 and outputs.max() <= 129
    assert prompts.mean() == pytest.approx(372.5, rel=0.02) and outputs.mean() == pytest.approx(45.3, rel=0.02)


def test_poisson_inter_arrival_mean_is_one_over_rate() -> None:
    arrivals = np.array([r.arrival_s for r in generate(WorkloadSpec("chat", 20000, rate=4.0, seed=1))])
    gaps = np.diff(arrivals, prepend=0.0)
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)


def test_rate_zero_arrives_all_at_once() -> None:
    assert {r.arrival_s for r in generate(WorkloadSpec("chat", 50))} == {0.0}


def test_llama31_8b_weights_on_t4_are_refused_not_squeezed() -> None:
    with pytest.raises(UnsupportedSetup, match="do not fit"):
        published_setup("t4", "llama3.1-8b", 4096, 256)


def test_t4_llama2_accelerator_pool_is_a_thousand_odd_tokens() -> None:
    setup = published_setup("t4", "llama2-7b", 4096, 256)
    assert 900 <= setup.worker.num_kv_blocks * setup.worker.block_size <= 1300
    assert setup.worker.num_cpu_kv_blocks * setup.worker.block_size == 65536  # 32 GiB at 0.5 MiB per token


@pytest.mark.parametrize("policy", POLICIES)
def test_engine_finishes_every_request_at_its_length_and_frees_every_block(policy: str) -> None:
    setup = published_setup("a10", "llama2-7b", 4096, 64)
    small = dataclasses.replace(setup, worker=dataclasses.replace(setup.worker, num_kv_blocks=48))  # preempts, swaps
    requests = generate(WorkloadSpec("chat", 40, rate=20.0, seed=3))
    requests = [r for r in requests if r.prompt_len + r.output_len <= 48 * 16]
    sim = Simulation(small, requests, config(policy), "chat")
    result = sim.run()
    assert sim.rejected == 0 and result.finished == len(requests)
    assert result.preemptions + result.swaps > 0, "the pool was meant to overflow"
    assert sim.produced == [r.output_len for r in requests]
    stats = sim.scheduler.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    for placement in Placement:
        assert stats.free_blocks[placement] == stats.total_blocks[placement], f"{placement.value} blocks leaked"
    assert result.output_tokens == sum(r.output_len for r in requests)
    assert sum(result.mode_mix.values()) == pytest.approx(1.0)
    hybrid = result.mode_mix.get("async_overlap", 0.0) + result.mode_mix.get("asym_pipeline", 0.0)
    assert sum(result.layout_mix.values()) == pytest.approx(1.0 if result.mean_cpu_rows else 0.0)
    assert result.mean_cpu_rows == 0 or hybrid > 0
    assert result.duration_s > 0 and result.ttft_p50_s <= result.ttft_p99_s and result.tpot_p50_ms > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_requests_held_back_by_a_full_queue_are_offered_again_and_all_finish(policy: str) -> None:
    setup = published_setup("a10", "llama2-7b", 4096, 64)
    requests = generate(WorkloadSpec("osc", 40, seed=2))  # all at once, ten times the queue
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, policy=policy, max_queued_requests=4)
    sim = Simulation(setup, requests, cfg, "osc")
    result = sim.run()
    assert result.finished == 40 and sim.produced == [r.output_len for r in requests]
    assert result.ttft_p99_s > result.ttft_p50_s > 0  # the held-back requests' clocks ran while they waited


def test_prefill_time_share_is_the_stepping_time_of_the_steps_with_a_prefill_chunk() -> None:
    setup = published_setup("a10", "llama2-7b", 4096, 64)

    def share(output_len: int) -> float:
        requests = generate(WorkloadSpec("grid", 4, grid_prompt_len=512, grid_output_len=output_len))
        return Simulation(setup, requests, config("gpu-only"), "grid").run().prefill_time_share

    assert share(1) == 1.0  # every step prefills: one token out, sampled by the prefill itself
    assert 1.0 > share(8) > share(64) > 0.0  # the longer the outputs, the more of the time decode-only steps take


@pytest.mark.parametrize("policy", POLICIES)
def test_long_prompts_are_prefilled_in_chunks_and_those_beyond_the_accelerator_pool_run_on_the_cpu(policy: str
                                                                                                  ) -> None:
    setup = published_setup("t4", "llama2-7b", 512, 64)  # an accelerator pool of about 1,100 tokens
    requests = generate(WorkloadSpec("summarize", 12, rate=2.0, seed=5))  # prompts of 1,024 to 4,000 tokens
    sim = Simulation(setup, requests, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512, policy=policy))
    result = sim.run()
    pool = setup.worker.num_kv_blocks * setup.worker.block_size
    larger = [r.prompt_len + r.output_len - 1 > pool for r in requests]
    if policy == "gpu-only":  # refused: the accelerator's pool is the only one it uses
        assert sim.rejected == sum(larger) > 0 and result.finished == len(requests) - sum(larger)
    else:
        assert sim.rejected == 0 and result.finished == len(requests)
        assert sim.produced == [r.output_len for r in requests]
    prefilled = sum(r.prompt_len for r, over in zip(requests, larger) if policy != "gpu-only" or not over)
    assert result.mean_prefills * result.iterations >= prefilled / 512, "prompts were not chunked"


def fitted(setup, kind: str, n: int) -> list:
    return fit_to(generate(WorkloadSpec(kind, n, seed=0)), setup.worker.num_kv_blocks * setup.worker.block_size)


def test_fit_to_cuts_requests_to_the_accelerator_pool_output_first() -> None:
    requests = [SimRequest(0.0, 100, 50), SimRequest(0.0, 100, 2000), SimRequest(0.0, 3000, 10)]
    assert [(r.prompt_len, r.output_len) for r in fit_to(requests, 1000)] == [(100, 50), (100, 901), (500, 501)]


def test_apex_nearly_doubles_gpu_only_on_t4_llama2_chat() -> None:
    setup = published_setup("t4", "llama2-7b", 4096, 64)
    requests = fitted(setup, "chat", 150)
    gpu_only = Simulation(setup, requests, config("gpu-only"), "chat").run()
    apex = Simulation(setup, requests, config("apex"), "chat").run()
    assert gpu_only.finished == apex.finished == 150
    assert apex.throughput_tok_s > 1.5 * gpu_only.throughput_tok_s


def test_apex_beats_gpu_only_and_neo_on_a10_llama2_chat() -> None:
    setup = published_setup("a10", "llama2-7b", 4096, 256)
    requests = fitted(setup, "chat", 200)
    runs = {policy: Simulation(setup, requests, config(policy), "chat").run() for policy in POLICIES}
    assert runs["apex"].throughput_tok_s > max(runs["gpu-only"].throughput_tok_s, runs["neo"].throughput_tok_s)


def test_apex_spreads_summaries_prompts_and_passes_gpu_only_and_neo_as_it_runs_at_a_lower_tpot() -> None:
    """A10 LLaMA-3.1-8B summarize (2.6k-token prompts, 100-token outputs, some 14 requests in the accelerator's pool):
    gpu-only and NEO as its code runs prefill a budget at once and the decode steps after it pay the pass over the
    weights for a few rows; apex spreads the prompts at the decode step's ridge while requests wait and the pool is
    full, so that each step carries the decode rows. At the default --max-sit-out apex yields more tokens/s than both,
    each request's tokens coming faster (TPOT p99) than under either."""
    setup = published_setup("a10", "llama3.1-8b", 4096, 256)
    requests = generate(WorkloadSpec("summarize", 300, seed=0))
    base = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096)
    runs = {policy: Simulation(setup, requests, base, "summarize", policy).run()
            for policy in ("apex", "gpu-only", "neo-published")}
    apex, others = runs.pop("apex"), runs.values()
    assert apex.finished == 300
    assert apex.throughput_tok_s > 1.02 * max(r.throughput_tok_s for r in others)
    assert apex.tpot_p99_ms < min(r.tpot_p99_ms for r in others)


def test_this_machine_runs_on_a_profile_and_its_model_config(tmp_path) -> None:
    line = {"xs": [1, 64], "ys": [1000.0, 3000.0]}
    grid = {"xs": [1, 16], "ys": [16, 4096], "zs": [[500.0, 4000.0], [800.0, 8000.0]]}
    profile = {"version": TABLE_VERSION, "key": {}, "num_layers": 2, "tables": {
        "t_lin": line, "t_pref": {"xs": [16, 256], "ys": [0, 256], "zs": [[200.0, 400.0], [4000.0, 8000.0]]},
        "t_gatt": grid, "t_catt": grid,
        "t_xfer": {"xs": [1000, 100000], "ys": [100.0, 10000.0]}, "t_sync": {"xs": [0], "ys": [5000.0]},
        "t_step": line}}
    model = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 258, "eos_token_id": 0, "torch_dtype": "float32"}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(model))
    setup = profiled_setup(str(tmp_path / "profile.json"), str(tmp_path / "tiny" / "config.json"), 16, 256)
    assert setup.model == "tiny" and setup.worker.eos_token_ids == (0,)
    sim = Simulation(setup, generate(WorkloadSpec("grid", 12, grid_prompt_len=40, grid_output_len=20)),
                     config("apex"), "grid")
    assert sim.run().finished == 12 and sim.produced == [20] * 12


def test_steady_throughput_is_neos_middle_of_the_completions() -> None:
    """Ten completions one second apart (shuffled): NEO's window takes the gaps 3..6, from the 4th completion (4 s) to
    the 8th (8 s), so 1 request/s and the outputs of the 5th to the 8th completions over those 4 s."""
    finish_s = np.array([7, 2, 9, 4, 1, 10, 3, 8, 6, 5], dtype=float)
    outputs = (100 * finish_s).astype(np.int64)  # [10]: the completion at t s produced 100 t tokens
    tokens_per_s, requests_per_s = steady_window(finish_s * 1e9, outputs)
    gaps = np.diff(np.sort(finish_s))
    assert requests_per_s == pytest.approx(1 / np.mean(gaps[3:7])) == pytest.approx(1.0)
    assert tokens_per_s == pytest.approx((500 + 600 + 700 + 800) / 4)
    assert np.isnan(steady_window(np.array([1e9, 2e9, 3e9]), np.array([1, 1, 1]))).all()  # too few completions


def test_a_workload_the_accelerator_pool_cannot_hold_is_refused_naming_the_pool(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    args = ["--hardware", "t4", "--workload", "cot", "--requests", "6", "--no-plot", "--out-dir", str(tmp_path)]
    with caplog.at_level(logging.ERROR):
        assert main(args) == 1
    assert "cot (seed 0) on t4/llama2-7b: 6 of 6 requests (100%) peak above the accelerator's KV pool of 1,088" in \
        caplog.text
    assert "--fit-to-accelerator" in caplog.text


def test_fit_to_accelerator_cuts_and_reports_the_share_cut(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    args = ["--hardware", "t4", "--workload", "cot,osc", "--requests", "6", "--no-plot", "--out-dir", str(tmp_path),
            "--policies", "gpu-only", "--fit-to-accelerator"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    runs = {r["workload"]: r for r in json.loads((tmp_path / "simulate.json").read_text())["runs"]}
    assert runs["cot"]["cut_fraction"] == 1.0 and runs["osc"]["cut_fraction"] == 0.0
    assert runs["cot"]["finished"] == runs["osc"]["finished"] == 6
    assert "100% of the requests cut to the accelerator's KV pool" in caplog.text


def test_cli_writes_json_and_png(tmp_path) -> None:
    out = tmp_path / "sim"
    rc = main(["--hardware", "t4", "--hardware", "a10", "--workload", "grid", "--grid-prompt-len", "64",
               "--grid-output-len", "16", "--requests", "20", "--out-dir", str(out)])
    assert rc == 0
    result = json.loads((out / "simulate.json").read_text())
    assert {(r["hardware"], r["policy"]) for r in result["runs"]} == {(h, p) for h in ("t4", "a10") for p in VARIANTS}
    assert all(r["finished"] == 20 for r in result["runs"])
    assert all(r["layout_mix"] == {} for r in result["runs"] if r["policy"] == "gpu-only")
    assert (out / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
