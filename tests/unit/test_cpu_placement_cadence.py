"""The prefill cadence of apex's CPU placement, priced on the simulator's A10 / LLaMA-3.1-8B setup: long prompts with
short outputs go to the CPU up to the rows one prefill step hides where the pools' turnover brings a prefill step
within every sit-out window, and not otherwise; a step whose due CPU rows a decode-only step would wait for admits a
prompt to the CPU so that its chunk hides them."""

from collections import deque
from itertools import accumulate

from apex_serve.types import Placement, SamplingParams
from apex_tools.sim.setups import Setup, published_setup
from scheduler_service.admission import Admission
from scheduler_service.cpu_placement import CpuPlacement
from scheduler_service.kv_manager import KVManager
from scheduler_service.policies import ApexPolicy, NeoPolicy
from scheduler_service.prefill import Prefilling
from scheduler_service.request import Request

BUDGET = 4096
SUMMARY = (2500, 100)  # prompt, output tokens: LLaMA-3.1-8B's decode step on the A10 hides one 2.6k-token CPU row
CHAIN_OF_THOUGHT = (200, 2000)


def a10() -> Setup:
    return published_setup("a10", "llama3.1-8b", BUDGET, 256)


def request(name: str, shape: tuple[int, int]) -> Request:
    prompt, output = shape
    return Request(name, (1,) * prompt, SamplingParams(max_tokens=output), prompt + output - 1)


def requests(prefix: str, n: int, shape: tuple[int, int] = SUMMARY) -> list[Request]:
    return [request(f"{prefix}{i}", shape) for i in range(n)]


def pools(setup: Setup) -> KVManager:
    kv = KVManager(setup.worker.num_kv_blocks, 0, setup.worker.block_size)
    kv.set_cpu_pool(setup.worker.num_cpu_kv_blocks)
    return kv


def placement(setup: Setup, max_sit_out: int, kv: KVManager | None = None, policy: type = ApexPolicy) -> CpuPlacement:
    return CpuPlacement(policy(setup.cost_model()), kv or pools(setup), setup.worker.cpu_max_rows, max_sit_out,
                        BUDGET)


def test_summaries_get_cadence_rows_where_a_prefill_step_comes_within_the_sit_out_window() -> None:
    setup = a10()
    waiting = requests("w", 64)
    rows, context = 14, 2550  # the accelerator pool sustains 14 summaries
    sustained = placement(setup, max_sit_out=8).cadence_rows(rows, context, waiting)
    assert 40 <= sustained <= setup.worker.cpu_max_rows  # a 4,096-token prefill step hides tens of CPU rows
    # four iterations: 14 x 4 accelerator rows and the hidden ones finish too few summaries to admit a budget again
    assert placement(setup, max_sit_out=4).cadence_rows(rows, context, waiting) == 0


def test_long_outputs_an_empty_queue_and_policies_without_a_window_get_no_cadence_rows() -> None:
    setup = a10()
    apex = placement(setup, max_sit_out=8)
    assert apex.cadence_rows(14, 2550, requests("w", 64, CHAIN_OF_THOUGHT)) == 0
    assert apex.cadence_rows(14, 2550, []) == 0  # no prompt waits: no prefill step comes
    assert placement(setup, 8, policy=NeoPolicy).cadence_rows(14, 2550, requests("w", 64)) == 0


def contexts(num_cpu: int) -> list[int]:
    """Prefix sums of the decode contexts of num_cpu summaries on the CPU."""
    return list(accumulate([SUMMARY[0] + 1] * num_cpu, initial=0))


def test_the_cpu_takes_summaries_up_to_its_cadence_rows_where_the_steady_test_refuses() -> None:
    setup = a10()
    kv = pools(setup)
    apex = placement(setup, max_sit_out=8, kv=kv)
    gpu = requests("g", 14)
    waiting = requests("w", 64)
    cadence = apex.cadence_rows(*apex._sustained_rows(gpu), waiting)
    assert cadence > 0
    assert apex.takes(waiting[0], gpu, waiting, contexts(cadence - 1), num_cpu=cadence - 1)
    assert not apex.takes(waiting[0], gpu, waiting, contexts(cadence), num_cpu=cadence)
    bounded = placement(setup, max_sit_out=4, kv=kv)
    assert not bounded.takes(waiting[0], gpu, waiting, contexts(8), num_cpu=8)


def full_pools(setup: Setup, num_cpu: int) -> tuple[KVManager, list[Request], deque[Request]]:
    """Pools of the A10 setup with the accelerator's filled by summaries and num_cpu summaries on the CPU."""
    kv = pools(setup)
    gpu = []
    while kv.can_allocate(Placement.GPU, SUMMARY[0]):
        gpu.append(request(f"g{len(gpu)}", SUMMARY))
        kv.allocate(gpu[-1], Placement.GPU, SUMMARY[0])
    cpu = deque(requests("c", num_cpu))
    for r in cpu:
        kv.allocate(r, Placement.CPU, SUMMARY[0])
    return kv, gpu, cpu


def test_cpu_rows_a_decode_step_would_wait_for_pull_a_prompt_onto_the_cpu_to_hide_under_its_chunk() -> None:
    setup = a10()
    kv, gpu, cpu = full_pools(setup, num_cpu=90)  # beyond the rows a prefill step hides: the CPU test refuses
    admission = Admission(256, kv, placement(setup, max_sit_out=8, kv=kv), Prefilling())
    waiting = deque(requests("w", 64))
    assert admission.admit(waiting, BUDGET, [], gpu, cpu, len(gpu), 2550) == []
    admitted = admission.admit(waiting, BUDGET, [], gpu, cpu, len(gpu), 2550, pull=True)
    assert [c.request.request_id for c in admitted] == ["w0"]  # one prompt: its chunk makes the prefill step
    assert admitted[0].request.placement is Placement.CPU and admitted[0].tokens == SUMMARY[0]


def test_no_prompt_is_pulled_where_no_cadence_is_sustained() -> None:
    setup = a10()
    kv, gpu, cpu = full_pools(setup, num_cpu=90)
    admission = Admission(256, kv, placement(setup, max_sit_out=4, kv=kv), Prefilling())
    assert admission.admit(deque(requests("w", 64)), BUDGET, [], gpu, cpu, len(gpu), 2550, pull=True) == []
