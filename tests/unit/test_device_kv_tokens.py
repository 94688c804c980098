"""The KV tokens the accelerator's decode attention reads, as the scheduler prices them: each row's own context under
FlashInfer's paged kernel, the longest row's for every row under SDPA's padded batch; told by the worker."""

from apex_serve import convert
from apex_serve.types import Placement, SamplingParams, WorkerInfo
from scheduler_service.admission import Steady
from scheduler_service.decision import DeviceRows, device_kv_tokens
from scheduler_service.request import Request


def worker(decode_attention: str) -> WorkerInfo:
    return WorkerInfo("m", 2, 32, 256, (0,), 16, 64, "cuda:0", "float16", decode_attention=decode_attention)


def request(tokens: int) -> Request:
    return Request("r", tuple(range(1, tokens + 1)), SamplingParams(max_tokens=4), peak_tokens=tokens + 4)


def test_paged_kernel_reads_each_rows_context_and_sdpa_pads_every_row_to_the_longest() -> None:
    assert device_kv_tokens([10, 100, 40], paged=True) == 150
    assert device_kv_tokens([10, 100, 40], paged=False) == 300
    assert device_kv_tokens([], paged=False) == device_kv_tokens([], paged=True) == 0


def test_only_flashinfer_is_paged_and_an_unsaid_kernel_is_priced_as_sdpa() -> None:
    assert worker("flashinfer").paged_decode
    assert not worker("sdpa").paged_decode
    assert not worker("").paged_decode


def test_the_decode_kernel_survives_the_protobuf_round_trip() -> None:
    for kernel in ("flashinfer", "sdpa", ""):
        assert convert.worker_info_from_pb(convert.worker_info_to_pb(worker(kernel))) == worker(kernel)


def test_admissions_steady_iteration_adds_an_accelerator_row_as_its_kernel_reads_it() -> None:
    rows = [Steady(DeviceRows.of([30, 50]), [0], paged) for paged in (True, False)]
    paged, padded = (s.with_request(request(79), Placement.GPU) for s in rows)  # decodes at its 80th token
    assert (paged.gpu_rows, paged.gpu_kv_tokens) == (3, 30 + 50 + 80)
    assert (padded.gpu_rows, padded.gpu_kv_tokens) == (3, 3 * 80)
    short = rows[1].with_request(request(9), Placement.GPU)  # shorter than the longest: every row still reads 50
    assert short.gpu_kv_tokens == 3 * 50
    on_cpu = rows[0].with_request(request(9), Placement.CPU)
    assert (on_cpu.gpu_kv_tokens, on_cpu.cpu_context) == (80, [0, 10])
