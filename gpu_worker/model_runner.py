"""Executes StepPlans: keeps per-request token state, runs the model over the step's rows, samples."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apex_serve.errors import InvalidArgument
from apex_serve.types import SamplingParams, StepOutput, StepPlan, StepTimings, TokenLogprob, WorkerInfo
from gpu_worker.attention import AttentionMetadata, PagedAttention
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.kv_cache import PagedKVCache, bytes_per_block
from gpu_worker.layers import post_attention, pre_attention, rms_norm
from gpu_worker.model_config import ModelConfig, load_model_config
from gpu_worker.rope import RotaryEmbedding
from gpu_worker.sampler import Sampler, compute_logprobs
from gpu_worker.weights import load_weights

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Request:
    token_ids: list[int]  # prompt, then every token sampled for it
    num_prompt_tokens: int
    sampling: SamplingParams
    block_ids: list[int]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class _Batch:
    request_ids: list[str]  # scheduled requests in layout order: prefill rows, then decode rows
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    last_rows: torch.Tensor  # [num_requests] index of each request's last token
    metadata: AttentionMetadata


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelRunner:
    """The gpu_worker's model: weights, KV pool, request state. Block ids come from the scheduler."""

    def __init__(self, config: GpuWorkerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.dtype = _DTYPES[config.dtype]
        self.model_config: ModelConfig = load_model_config(config.model_dir)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        rope = RotaryEmbedding(self.model_config, self.max_model_len, self.dtype, self.device)
        self.weights = load_weights(config.model_dir, self.model_config, self.dtype, self.device, rope)
        per_block = bytes_per_block(self.model_config, config.block_size, self.dtype)
        num_blocks = config.num_kv_blocks or config.device_kv_budget_bytes // per_block
        if num_blocks == 0:
            raise ValueError(
                f"device_kv_budget_bytes: {config.device_kv_budget_bytes} is under one block ({per_block} bytes)"
            )
        if num_blocks * config.block_size < self.max_model_len:
            logger.warning(
                "KV pool of %d blocks cannot hold one request of max_model_len %d", num_blocks, self.max_model_len
            )
        self.kv_cache = PagedKVCache(self.model_config, num_blocks, config.block_size, self.dtype, self.device)
        self.attention = PagedAttention(self.kv_cache)
        self.sampler = Sampler(config.seed, self.device, self.model_config.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._info = WorkerInfo(
            model_name=Path(config.model_dir).resolve().name,
            num_layers=self.model_config.num_hidden_layers,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.model_config.eos_token_ids,
            block_size=config.block_size,
            num_kv_blocks=num_blocks,
            device=str(self.device),
            dtype=config.dtype,
        )
        logger.info("model runner ready: %s", self._info)

    @property
    def info(self) -> WorkerInfo:
        return self._info

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step and sample one token per scheduled request (with logprobs where asked for)."""
        start = time.perf_counter_ns()
        batch = self._prepare(plan)
        prepared = time.perf_counter_ns()
        if batch is None:
            timings = StepTimings(prepare_ns=prepared - start, total_ns=prepared - start)
            return StepOutput(step_id=plan.step_id, timings=timings)
        logits = self._forward(batch)  # [num_requests, vocab]
        self._synchronize()
        forwarded = time.perf_counter_ns()
        sampled, logprobs = self._sample(batch.request_ids, logits)
        done = time.perf_counter_ns()
        timings = StepTimings(
            prepare_ns=prepared - start,
            forward_ns=forwarded - prepared,
            sample_ns=done - forwarded,
            total_ns=done - start,
        )
        return StepOutput(step_id=plan.step_id, sampled=sampled, timings=timings, logprobs=logprobs)

    def compute_logits(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        """Run one step without sampling: fp32 logits [vocab] of each scheduled request's last position."""
        batch = self._prepare(plan)
        if batch is None:
            return {}
        logits = self._forward(batch)  # [num_requests, vocab]
        return dict(zip(batch.request_ids, logits.unbind(0)))

    def sample(self, logits: dict[str, torch.Tensor]) -> dict[str, int]:
        """Sample from compute_logits' output and append each token to its request, as execute does;
        logprobs reach only execute's StepOutput."""
        return self._sample(list(logits), torch.stack(list(logits.values())))[0]

    def _sample(
        self, request_ids: list[str], logits: torch.Tensor
    ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Tokens of logits [num_requests, vocab], and logprobs of the requests that ask for them."""
        requests = [self._requests[rid] for rid in request_ids]
        params = [r.sampling for r in requests]
        tokens = self.sampler.sample(
            logits, params, [r.num_output_tokens for r in requests], [r.token_ids for r in requests]
        )
        logprobs = compute_logprobs(logits, params, tokens)
        for request, token in zip(requests, tokens):
            request.token_ids.append(token)
        return dict(zip(request_ids, tokens)), {request_ids[i]: lp for i, lp in logprobs.items()}

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """fp32 logits [num_requests, vocab]; only the last layer's needed rows go past attention."""
        weights = self.weights
        with torch.inference_mode():
            hidden = F.embedding(batch.input_ids, weights.embed_tokens)  # [num_tokens, hidden]
            last_layer = len(weights.layers) - 1
            for i, layer in enumerate(weights.layers):
                q, k, v = pre_attention(layer, hidden, batch.positions)
                attn = self.attention.forward(i, q, k, v, batch.metadata)  # [num_tokens, num_heads, head_dim]
                if i == last_layer:
                    hidden, attn = hidden[batch.last_rows], attn[batch.last_rows]  # [num_requests, ...]
                hidden = post_attention(layer, hidden, attn)
            normed = rms_norm(hidden, weights.final_norm, self.model_config.rms_norm_eps)  # [num_requests, hidden]
            return F.linear(normed, weights.lm_head).float()  # [num_requests, vocab]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prepare(self, plan: StepPlan) -> _Batch | None:
        """Apply the plan's state changes (after validating them) and lay out the step's tokens."""
        for request_id in plan.freed_request_ids:
            self._requests.pop(request_id, None)
        self._validate(plan)
        for new in plan.new_requests:
            self._requests[new.request_id] = _Request(
                token_ids=list(new.token_ids),
                num_prompt_tokens=len(new.token_ids) - new.num_output_tokens,
                sampling=new.sampling,
                block_ids=list(new.block_ids),
            )
        for cached in plan.cached_requests:
            self._requests[cached.request_id].block_ids.extend(cached.new_block_ids)
        if plan.is_empty:
            return None
        block_size = self.config.block_size
        request_ids: list[str] = []
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        last_rows: list[int] = []
        for new in plan.new_requests:
            request_ids.append(new.request_id)
            input_ids.extend(new.token_ids)
            positions.extend(range(len(new.token_ids)))
            slot_blocks.extend(new.block_ids[p // block_size] for p in range(len(new.token_ids)))
            last_rows.append(len(input_ids) - 1)
        tables: list[list[int]] = []
        context_lens: list[int] = []
        for cached in plan.cached_requests:
            request = self._requests[cached.request_id]
            position = len(request.token_ids) - 1
            request_ids.append(cached.request_id)
            input_ids.append(request.token_ids[-1])
            positions.append(position)
            slot_blocks.append(request.block_ids[position // block_size])
            last_rows.append(len(input_ids) - 1)
            tables.append(request.block_ids[: position // block_size + 1])
            context_lens.append(position + 1)
        metadata = AttentionMetadata.build(
            prefill_lens=[len(new.token_ids) for new in plan.new_requests],
            slot_blocks=slot_blocks,
            slot_offsets=[p % block_size for p in positions],
            decode_block_tables=tables,
            decode_context_lens=context_lens,
            block_size=block_size,
            device=self.device,
        )
        return _Batch(
            request_ids=request_ids,
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            last_rows=torch.tensor(last_rows, dtype=torch.long, device=self.device),
            metadata=metadata,
        )

    def _validate(self, plan: StepPlan) -> None:
        """Raise InvalidArgument naming the first request the worker cannot run as planned."""
        seen: set[str] = set()
        for new in plan.new_requests:
            rid = new.request_id
            if rid in seen:
                raise InvalidArgument("new_requests", f"request {rid!r} is scheduled twice")
            seen.add(rid)
            if not new.token_ids:
                raise InvalidArgument("token_ids", f"request {rid!r} has no tokens")
            if not 0 <= new.num_output_tokens < len(new.token_ids):
                raise InvalidArgument(
                    "num_output_tokens", f"request {rid!r}: {new.num_output_tokens} of {len(new.token_ids)} tokens"
                )
            vocab = self.model_config.vocab_size
            if not all(0 <= t < vocab for t in new.token_ids):
                raise InvalidArgument("token_ids", f"request {rid!r} has a token id outside [0, {vocab})")
            self._check_blocks(rid, new.block_ids, len(new.token_ids) - 1)
        for cached in plan.cached_requests:
            rid = cached.request_id
            if rid in seen:
                raise InvalidArgument("cached_requests", f"request {rid!r} is scheduled twice")
            seen.add(rid)
            request = self._requests.get(rid)
            if request is None:
                raise InvalidArgument("cached_requests", f"request {rid!r} is not known to the worker")
            self._check_blocks(rid, request.block_ids + list(cached.new_block_ids), len(request.token_ids) - 1)

    def _check_blocks(self, request_id: str, block_ids: list[int] | tuple[int, ...], last_position: int) -> None:
        if last_position >= self.max_model_len:
            raise InvalidArgument(
                "max_model_len", f"request {request_id!r} reaches position {last_position} >= {self.max_model_len}"
            )
        needed = last_position // self.config.block_size + 1
        if len(block_ids) < needed:
            raise InvalidArgument(
                "block_ids",
                f"request {request_id!r} has {len(block_ids)} blocks, position {last_position} needs {needed}",
            )
        if not all(0 <= b < self.kv_cache.num_blocks for b in block_ids[:needed]):
            raise InvalidArgument(
                "block_ids", f"request {request_id!r} has a block id outside [0, {self.kv_cache.num_blocks})"
            )
