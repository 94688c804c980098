"""The simulator's policy variants (apex_tools.sim.variants): neo without the sit-out bound, and NEO as its code runs
(neo-published), whose launch cost the truth and its own model pay."""

import dataclasses

import pytest

from apex_serve.types import ExecutionMode
from apex_tools.sim.engine import Simulation
from apex_tools.sim.setups import published_setup
from apex_tools.sim.variants import (
    NEO_LAUNCH_MS,
    UNBOUNDED_SIT_OUT,
    VARIANTS,
    LaunchCharged,
    NeoAsPublished,
    variant,
)
from apex_tools.sim.workloads import WorkloadSpec, generate
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ComposedCostModel
from scheduler_service.cost.shape import IterationShape, SubBatchShape

CONFIG = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096)


def test_neos_launch_cost_is_paid_once_per_sub_batch_with_cpu_rows_per_layer() -> None:
    setup = published_setup("t4", "llama2-7b", 4096, 256)
    charged = LaunchCharged(setup.costs, NEO_LAUNCH_MS * 1e6)
    assert charged.t_catt(8, 8000) - setup.costs.t_catt(8, 8000) == pytest.approx(800_000.0)
    assert charged.t_catt(0, 0) == setup.costs.t_catt(0, 0)
    assert charged.t_lin(64) == setup.costs.t_lin(64)
    plain, neo = ComposedCostModel(setup.costs, setup.shape), ComposedCostModel(charged, setup.shape)
    layers = setup.shape.num_layers
    # 40 CPU rows of 1,000 tokens: their attention (12 ms a layer on the T4's host) outlasts the accelerator's work,
    # so the launch lands on the step's critical path once per sub-batch and layer
    overlap = IterationShape(ExecutionMode.ASYNC_OVERLAP, (SubBatchShape((), 2, 2000, 40, 40_000),))
    assert neo.predict_raw(overlap).total_ns - plain.predict_raw(overlap).total_ns == pytest.approx(layers * 0.8e6)
    piped = IterationShape(ExecutionMode.ASYM_PIPELINE, (SubBatchShape((), 2, 2000, 20, 20_000),
                                                         SubBatchShape((), 0, 0, 20, 20_000)))
    assert neo.predict_raw(piped).total_ns - plain.predict_raw(piped).total_ns == pytest.approx(layers * 1.6e6)


def test_variants_run_neo_without_the_sit_out_bound_and_neo_published_with_its_rules() -> None:
    setup = published_setup("a10", "llama2-7b", 4096, 64)
    neo, published, apex = (variant(name, setup, CONFIG) for name in ("neo", "neo-published", "apex"))
    assert (neo.config.policy, neo.config.max_sit_out, neo.setup) == ("neo", UNBOUNDED_SIT_OUT, setup)
    assert apex.config.max_sit_out == CONFIG.max_sit_out and apex.policy(setup.cost_model()) is None
    assert published.config.max_sit_out == UNBOUNDED_SIT_OUT
    assert isinstance(published.setup.costs, LaunchCharged) and published.setup.costs.launch_ns == 800_000.0
    policy = published.policy(published.setup.cost_model())
    assert isinstance(policy, NeoAsPublished) and policy.swap_in_occupancy == 0.95
    with pytest.raises(ValueError, match="policy"):
        variant("vllm", setup, CONFIG)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_finishes_every_request_and_frees_every_block(name: str) -> None:
    setup = published_setup("a10", "llama2-7b", 4096, 64)
    small = dataclasses.replace(setup, worker=dataclasses.replace(setup.worker, num_kv_blocks=48))
    requests = [r for r in generate(WorkloadSpec("chat", 40, rate=20.0, seed=3)) if r.prompt_len + r.output_len <= 768]
    sim = Simulation(small, requests, CONFIG, "chat", name)
    result = sim.run()
    assert result.policy == name and result.finished == len(requests)
    assert sim.produced == [r.output_len for r in requests]
    stats = sim.scheduler.stats()
    assert all(stats.free_blocks[p] == stats.total_blocks[p] for p in stats.total_blocks)
    assert (sim.ttft_s > 0).all() and (sim.tpot_ms[[r.output_len > 1 for r in requests]] > 0).all()


def test_neo_published_places_prefills_that_overflow_the_accelerator_on_the_cpu() -> None:
    # a T4's pool of about 1,100 tokens and 60 requests at once: NEO sends every prefill that overflows to the CPU
    setup = published_setup("t4", "llama2-7b", 4096, 256)
    requests = generate(WorkloadSpec("osc", 60, seed=1))
    published = Simulation(setup, requests, CONFIG, "osc", "neo-published").run()
    assert published.mean_cpu_rows > 0 and published.finished == 60
