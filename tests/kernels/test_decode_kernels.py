"""The decode kernels behind PagedAttention: the pages handed to FlashInfer (indptr, indices, last page lengths) and
the HND views of the pool, checked through a stand-in that computes FlashInfer's documented semantics in float64; the
choice per device, dtype and capability with its refusals; FlashInfer itself on CUDA (marked gpu, skipped without a
device or without flashinfer installed)."""

import math
from types import SimpleNamespace

import pytest
import torch
from paged_pools import BLOCK, disjoint_tables, random_pool

from gpu_worker import decode_kernels
from gpu_worker.attention import AttentionMetadata, PagedAttention, PageRows
from gpu_worker.decode_kernels import FlashInferDecode, SdpaDecode, decode_kernel_for, flashinfer_refusal
from gpu_worker.model_config import parse_model_config

SHAPES = [(4, 4, 16), (8, 2, 16), (32, 8, 128)]  # (q heads, kv heads, head_dim)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
CONTEXTS = [1, 17, 40, 64, 5, 16]
CONFIG = parse_model_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 64})


class FakeWrapper:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper as its docstring defines it, computed in float64 on the host:
    plan() takes indptr [rows + 1], indices [pages] and last_page_len [rows] (int32); run(q, (k, v)) reads row r's
    pages indices[indptr[r]:indptr[r+1]] of K/V [pages, kv_heads, page_size, head_dim] (HND), the last one up to
    last_page_len[r], query head h against KV head h // group."""

    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD") -> None:
        assert kv_layout == "HND", "the pool's per-layer layout is HND"
        self.plans: list[dict] = []

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, **kwargs: object) -> None:
        assert indptr.dtype == indices.dtype == last_page_len.dtype == torch.int32
        assert indptr.device.type == last_page_len.device.type == "cpu", "host tensors: plan() does not synchronise"
        assert kwargs["pos_encoding_mode"] == "NONE", "q and k arrive rotated"
        self.plans.append(dict(indptr=indptr.tolist(), indices=indices.tolist(), last=last_page_len.tolist(),
                               heads=(num_qo_heads, num_kv_heads, head_dim), page_size=page_size, **kwargs))

    def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        plan, (k_cache, v_cache) = self.plans[-1], kv
        num_qo_heads, num_kv_heads, head_dim = plan["heads"]
        assert k_cache.shape[1:] == (num_kv_heads, plan["page_size"], head_dim) and q.dtype == plan["q_data_type"]
        out = torch.empty(q.shape, dtype=torch.float64)
        for row in range(q.shape[0]):
            pages = plan["indices"][plan["indptr"][row] : plan["indptr"][row + 1]]
            length = (len(pages) - 1) * plan["page_size"] + plan["last"][row]
            k = k_cache[pages].double().transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :length]
            v = v_cache[pages].double().transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :length]
            group = num_qo_heads // num_kv_heads
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            scores = torch.einsum("hd,hcd->hc", q[row].double(), k) / math.sqrt(head_dim)
            out[row] = torch.einsum("hc,hcd->hd", scores.softmax(-1), v)
        return out.to(q.dtype)


def fake_flashinfer() -> SimpleNamespace:
    return SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=FakeWrapper, __version__="fake")


def test_page_rows_list_each_rows_pages_in_order_and_how_full_its_last_page_is() -> None:
    indptr, indices, last = PageRows.host_lists([[5, 2, 9, 4], [0, 7], [3]], [33, 16, 1], BLOCK)
    assert indptr == [0, 3, 4, 5]  # 33 tokens: 3 pages; 16: exactly one; 1: one
    assert indices == [5, 2, 9, 0, 3]  # a table's blocks past the context are not pages of the row
    assert last == [1, 16, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", SHAPES, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_flashinfer_decode_hands_flashinfer_the_pages_and_hnd_views_that_give_the_sdpa_paths_attention(
    heads: tuple[int, int, int], dtype: torch.dtype
) -> None:
    pool = random_pool(heads, dtype, "cpu")
    metadata = AttentionMetadata.build([], [], [], disjoint_tables(CONTEXTS), CONTEXTS, BLOCK, torch.device("cpu"))
    q = torch.randn(len(CONTEXTS), heads[0], heads[2], generator=torch.Generator().manual_seed(5)).to(dtype)
    kv = q[:, : heads[1]]
    sdpa = PagedAttention(pool, SdpaDecode())
    flashinfer = PagedAttention(pool, FlashInferDecode(fake_flashinfer(), torch.device("cpu"), heads[0]))
    for layer in (0, 1):
        got, want = flashinfer.forward(layer, q, kv, kv, metadata), sdpa.forward(layer, q, kv, kv, metadata)
        assert got.shape == q.shape and got.dtype == dtype
        assert (got.double() - want.double()).abs().max().item() <= 2 * TOLERANCE[dtype]


def test_flashinfer_decode_plans_once_per_sub_batch_per_step_on_its_own_wrapper() -> None:
    """ASYM_PIPELINE alternates two sub-batches layer by layer: each keeps its plan (a wrapper holds one) all step."""
    heads = SHAPES[1]
    pool = random_pool(heads, torch.float16, "cpu")
    kernel = FlashInferDecode(fake_flashinfer(), torch.device("cpu"), heads[0])
    attention = PagedAttention(pool, kernel)
    tables = disjoint_tables([20, 9, 33, 2])
    a = AttentionMetadata.build([], [], [], tables[:2], [20, 9], BLOCK, torch.device("cpu"))
    b = AttentionMetadata.build([], [], [], tables[2:], [33, 2], BLOCK, torch.device("cpu"))
    q = torch.randn(2, heads[0], heads[2], dtype=torch.float16)
    outputs = {}
    for layer in (0, 1):
        for name, metadata in (("a", a), ("b", b)):
            outputs[name, layer] = attention.forward(layer, q, q[:, :2], q[:, :2], metadata)
    wrappers = kernel._wrappers
    assert [len(w.plans) for w in wrappers] == [1, 1]
    assert [w.plans[0]["indptr"] for w in wrappers] == [[0, 2, 3], [0, 3, 4]]
    fresh = PagedAttention(pool, SdpaDecode())
    for (name, layer), got in outputs.items():
        want = fresh.forward(layer, q, q[:, :2], q[:, :2], a if name == "a" else b)
        assert (got.double() - want.double()).abs().max().item() <= 2 * TOLERANCE[torch.float16]


def test_flashinfer_plans_with_the_models_heads_and_the_pools_dtype() -> None:
    kernel = FlashInferDecode(fake_flashinfer(), torch.device("cpu"), 8)
    kernel.warm_up(kv_heads=2, block_size=BLOCK, head_dim=16, dtype=torch.float16)
    plan = kernel._wrappers[0].plans[0]
    assert plan["heads"] == (8, 2, 16) and plan["page_size"] == BLOCK
    assert plan["q_data_type"] == plan["kv_data_type"] == torch.float16
    assert kernel.workspace.numel() == decode_kernels.WORKSPACE_BYTES


@pytest.mark.parametrize(("device", "dtype", "capability", "reason"), [
    ("cpu", torch.float32, None, "runs on CUDA devices, this one is cpu"),
    ("cuda", torch.float16, (7, 0), "needs compute capability 7.5, this device is 7.0"),
    ("cuda", torch.float32, (8, 6), "takes float16 or bfloat16, the model runs in float32"),
])
def test_flashinfer_is_refused_naming_why_where_it_cannot_run(
    device: str, dtype: torch.dtype, capability: tuple[int, int] | None, reason: str
) -> None:
    assert reason in flashinfer_refusal(torch.device(device), dtype, capability)
    with pytest.raises(ValueError, match=f"decode_attention: flashinfer cannot run here: .*{reason}"):
        decode_kernel_for("flashinfer", torch.device(device), dtype, CONFIG, BLOCK, capability)
    assert isinstance(decode_kernel_for("auto", torch.device(device), dtype, CONFIG, BLOCK, capability), SdpaDecode)


@pytest.mark.parametrize("capability", [(7, 5), (8, 6)], ids=["t4", "a10"])
def test_flashinfer_would_serve_t4_and_a10_in_float16(capability: tuple[int, int]) -> None:
    assert flashinfer_refusal(torch.device("cuda"), torch.float16, capability) is None


def test_without_flashinfer_installed_auto_is_sdpa_and_naming_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_kernels, "import_flashinfer", lambda: None)
    args = (torch.device("cuda"), torch.float16, CONFIG, BLOCK, (8, 6))
    assert isinstance(decode_kernel_for("auto", *args), SdpaDecode)
    with pytest.raises(ValueError, match="flashinfer is not installed"):
        decode_kernel_for("flashinfer", *args)


def test_a_flashinfer_that_fails_its_warm_up_leaves_auto_on_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel FlashInfer cannot build (no CUDA toolkit for its JIT) fails at start-up, not in a step."""

    class Unbuildable(FakeWrapper):
        def plan(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("ninja: nvcc not found")

    unbuildable = SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=Unbuildable)
    monkeypatch.setattr(decode_kernels, "flashinfer_refusal", lambda device, dtype, capability: None)
    args = (torch.device("cpu"), torch.float16, CONFIG, BLOCK, (8, 6), unbuildable)
    assert isinstance(decode_kernel_for("auto", *args), SdpaDecode)
    with pytest.raises(ValueError, match="failed its warm-up: ninja: nvcc not found"):
        decode_kernel_for("flashinfer", *args)


def test_an_unknown_decode_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_attention: must be one of"):
        decode_kernel_for("triton", torch.device("cpu"), torch.float32, CONFIG, BLOCK)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", SHAPES, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_flashinfer_on_cuda_equals_the_sdpa_path(heads: tuple[int, int, int]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    flashinfer = pytest.importorskip("flashinfer")
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    config = parse_model_config({"hidden_size": heads[0] * heads[2], "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": heads[0], "num_key_value_heads": heads[1], "vocab_size": 64})
    kernel = decode_kernel_for("flashinfer", device, torch.float16, config, BLOCK, capability, flashinfer)
    pool = random_pool(heads, torch.float16, "cuda")
    metadata = AttentionMetadata.build([], [], [], disjoint_tables(CONTEXTS), CONTEXTS, BLOCK, device)
    q = torch.randn(len(CONTEXTS), heads[0], heads[2], generator=torch.Generator().manual_seed(5)).to(device,
                                                                                                     torch.float16)
    kv = q[:, : heads[1]]
    got = PagedAttention(pool, kernel).forward(1, q, kv, kv, metadata)
    want = PagedAttention(pool, SdpaDecode()).forward(1, q, kv, kv, metadata)
    assert (got.double() - want.double()).abs().max().item() <= 2 * TOLERANCE[torch.float16]
