"""One decode layer on the accelerator: the paged gather and the folded-group SDPA equal attention with K/V repeated per
query head (LLaMA's repeat_kv) computed in float64; no SDPA math backend runs; the layer's aten calls stay few (a
regression count). The CUDA cases are marked gpu (skipped without a device)."""

import collections
import math
from typing import Any

import pytest
import torch
from paged_pools import BLOCK, disjoint_tables, random_pool
from torch.utils._python_dispatch import TorchDispatchMode

from gpu_worker.attention import AttentionMetadata, PagedAttention, decode_attention
from gpu_worker.decode_kernels import SdpaDecode
from gpu_worker.kv_cache import PagedKVCache
from gpu_worker.layers import LayerWeights, post_attention, pre_attention, rms_norm
from gpu_worker.model_config import parse_model_config
from gpu_worker.rope import RotaryEmbedding

SHAPES = [(4, 4, 16), (8, 2, 16), (32, 8, 128)]  # (q heads, kv heads, head_dim): MHA, GQA, LLaMA-3.1-8B's heads
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VIEWS = {"aten.view", "aten.select", "aten.slice", "aten.unsqueeze", "aten._unsafe_view", "aten.t", "aten.transpose",
         "aten.split", "aten.split_with_sizes", "aten.expand", "aten.alias"}  # no kernel, no copy


class AtenCalls(TorchDispatchMode):
    """Counts the aten calls made under it, by op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: object, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _skip_without(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _step(contexts: list[int], device: str) -> AttentionMetadata:
    return AttentionMetadata.build([], [], [], disjoint_tables(contexts), contexts, BLOCK, torch.device(device))


def _reference(pool: PagedKVCache, layer: int, q: torch.Tensor, tables: list[list[int]], contexts: list[int]
               ) -> torch.Tensor:
    """Each row's attention over its first `context` positions, K/V repeated per query head, in float64."""
    rows, num_heads, head_dim = q.shape
    out = torch.empty(rows, num_heads, head_dim, dtype=torch.float64)
    for row, (table, context) in enumerate(zip(tables, contexts)):
        k = pool.k[layer, table].double().transpose(0, 1).reshape(pool.k.shape[2], -1, head_dim)[:, :context]
        v = pool.v[layer, table].double().transpose(0, 1).reshape(pool.v.shape[2], -1, head_dim)[:, :context]
        group = num_heads // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [num_heads, context, head_dim]
        scores = torch.einsum("hd,hcd->hc", q[row].double().cpu(), k.cpu()) / math.sqrt(head_dim)
        out[row] = torch.einsum("hc,hcd->hd", scores.softmax(-1), v.cpu())
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", SHAPES, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_paged_decode_attention_equals_repeated_kv_attention(heads: tuple[int, int, int], dtype: torch.dtype,
                                                             device: str) -> None:
    _skip_without(device)
    contexts = [1, 17, 40, 64, 5]
    pool, metadata = random_pool(heads, dtype, device), _step(contexts, device)
    tables = disjoint_tables(contexts)
    q = torch.randn(len(contexts), heads[0], heads[2], generator=torch.Generator().manual_seed(5)).to(device, dtype)
    attention = PagedAttention(pool, SdpaDecode())
    for layer in (0, 1):  # the second layer runs on the index and mask the first built
        got = attention.forward(layer, q, q[:, : heads[1]], q[:, : heads[1]], metadata)
        want = _reference(pool, layer, q, tables, contexts)
        assert got.shape == q.shape and got.dtype == dtype
        assert (got.double().cpu() - want).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_of_llama_heads_runs_one_fused_sdpa_and_no_math(device: str) -> None:
    _skip_without(device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    heads = SHAPES[-1]
    pool, metadata = random_pool(heads, dtype, device), _step([40, 20, 33], device)
    q = torch.randn(3, heads[0], heads[2], dtype=dtype, device=device)
    attention = PagedAttention(pool, SdpaDecode())
    attention.forward(0, q, q[:, : heads[1]], q[:, : heads[1]], metadata)  # the step's first layer builds its index
    with AtenCalls() as counted:
        attention.forward(1, q, q[:, : heads[1]], q[:, : heads[1]], metadata)
    sdpa = [op for op in counted.calls if op.startswith("aten._scaled_dot_product")]
    assert len(sdpa) == 1 and "math" not in sdpa[0], counted.calls
    assert not {"aten.bmm", "aten._safe_softmax", "aten._softmax"} & set(counted.calls), counted.calls


def test_one_decode_layer_makes_three_compute_calls_and_copies_nothing() -> None:
    """Per layer after the step's first: two gathers (K, V) and the SDPA; the rest are views (no transpose copy of
    the gathered blocks, no per-layer conversion of the boolean mask)."""
    heads = SHAPES[-1]
    pool, metadata = random_pool(heads, torch.bfloat16, "cpu"), _step([40, 20, 33], "cpu")
    q = torch.randn(3, heads[0], heads[2], dtype=torch.bfloat16)
    attention = PagedAttention(pool, SdpaDecode())
    attention.forward(0, q, q[:, : heads[1]], q[:, : heads[1]], metadata)
    with AtenCalls() as counted:
        attention.forward(1, q, q[:, : heads[1]], q[:, : heads[1]], metadata)
    compute = {op: n for op, n in counted.calls.items() if op not in VIEWS}
    assert compute == {"aten.index": 2, "aten._scaled_dot_product_flash_attention_for_cpu": 1}, counted.calls


@pytest.mark.filterwarnings("ignore:.*(Flash attention|kernel not used).*:UserWarning")
def test_decode_attention_raises_where_only_the_math_backend_could_run() -> None:
    q = torch.randn(2, 4, 8)
    k = torch.randn(2, 2, 16, 8)
    v = torch.randn(2, 2, 16, 12)  # a value head_dim no fused kernel takes
    with pytest.raises(RuntimeError, match="No available kernel"):
        decode_attention(q, k, v, torch.ones(2, 1, 1, 16, dtype=torch.bool))


def test_gather_reads_each_rows_blocks_in_table_order_for_every_head() -> None:
    pool = random_pool((8, 2, 16), torch.float32, "cpu")
    tables = torch.tensor([[5, 2, 9], [0, 7, 7]])
    k, v = pool.gather(1, tables)
    assert k.shape == (2, 2, 3 * BLOCK, 16)
    for row, table in enumerate(tables.tolist()):
        for head in range(2):
            want = torch.cat([pool.k[1, b, head] for b in table])  # [3 * block, head_dim]
            assert torch.equal(k[row, head], want)
            assert torch.equal(v[row, head], torch.cat([pool.v[1, b, head] for b in table]))


def test_one_decode_layer_makes_34_compute_calls() -> None:
    """LLaMA-3.1-8B's heads (a narrow MLP) at three decode rows, the step's angles and attention index built: per
    RMSNorm 8 (fp32 statistics as transformers), RoPE of q and k heads in one pass 5, the four projections and SwiGLU
    8, the KV write 2, attention 3 (two gathers, one SDPA), residuals 2 and the KV-pool dtype casts: no per-layer
    angle gather, transpose copy or mask conversion."""
    raw = {"hidden_size": 4096, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 64, "max_position_embeddings": 256}
    config, dtype = parse_model_config(raw), torch.bfloat16
    generator = torch.Generator().manual_seed(11)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    rope = RotaryEmbedding(config, 256, dtype, torch.device("cpu"))
    layer = LayerWeights(weight(4096), weight(6144, 4096), None, weight(4096, 4096), None, weight(4096),
                         weight(512, 4096), weight(4096, 256), 32, 8, 128, 1e-5)
    pool = PagedKVCache(config, 16, BLOCK, dtype, torch.device("cpu"))
    tables, contexts = [[1, 2, 3], [4, 5], [6, 7, 8]], [40, 20, 33]
    metadata = AttentionMetadata.build([], [t[(c - 1) // BLOCK] for t, c in zip(tables, contexts)],
                                       [(c - 1) % BLOCK for c in contexts], tables, contexts, BLOCK,
                                       torch.device("cpu"))
    attention, hidden = PagedAttention(pool, SdpaDecode()), weight(3, 4096)
    angles = rope.angles(torch.tensor([c - 1 for c in contexts]))

    def decode_layer(i: int) -> torch.Tensor:
        q, k, v = pre_attention(layer, hidden, angles)
        pool.write(i, k, v, metadata.slot_blocks, metadata.slot_offsets)
        return post_attention(layer, hidden, attention.forward(i, q, k, v, metadata))

    decode_layer(0)
    with AtenCalls() as counted:
        decode_layer(1)
    compute = {op: n for op, n in counted.calls.items() if op not in VIEWS}
    assert sum(compute.values()) == 34, str(sorted(compute.items()))
    assert not {"aten.clone", "aten.where", "aten.index_select"} & set(compute), compute


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_equals_transformers_llama_rms_norm(dtype: torch.dtype, device: str) -> None:
    """Bitwise on the CPU (the same ops); on CUDA, where torch fuses the statistics, within one rounding of dtype."""
    _skip_without(device)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(13)
    x = torch.randn(5, 256, generator=generator).to(device, dtype)
    norm = LlamaRMSNorm(256, eps=1e-5).to(device, dtype)
    norm.weight.data = torch.randn(256, generator=generator).to(device, dtype)
    got, want = rms_norm(x, norm.weight.data, 1e-5), norm(x)
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        assert (got.float() - want.float()).abs().max().item() <= TOLERANCE[dtype] * want.abs().max().item()


@pytest.mark.gpu
def test_rms_norm_is_one_fused_statistics_kernel_on_cuda() -> None:
    _skip_without("cuda")
    x = torch.randn(3, 4096, dtype=torch.float16, device="cuda")
    weight = torch.randn(4096, dtype=torch.float16, device="cuda")
    with AtenCalls() as counted:
        rms_norm(x, weight, 1e-5)
    compute = {op: n for op, n in counted.calls.items() if op not in VIEWS}
    assert compute == {"aten._to_copy": 2, "aten._fused_rms_norm": 1, "aten.mul": 1}, compute
