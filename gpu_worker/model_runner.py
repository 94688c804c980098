"""Executes StepPlans: keeps per-request token state, runs the model over the step's rows, samples."""

import hashlib
import json
import logging
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from apex_serve.errors import CpuPoolLost
from apex_serve.hardware import HardwareFingerprint, fingerprint
from apex_serve.types import Placement, StepOutput, StepPlan, StepTimings, SwapData, TokenLogprob, WorkerInfo
from cpu_attention_worker.client import CpuAttentionError
from cpu_attention_worker.data_plane import DataPlaneSpec
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.cpu_bridge import BlockMove, CpuAttentionBridge
from gpu_worker.cpu_pool import CpuPool, drop_lost_requests
from gpu_worker.decode_graphs import DecodeGraphs, capture_for
from gpu_worker.decode_kernels import decode_kernel_for
from gpu_worker.device_fit import CudaDevice, check_fits, resolve_dtype
from gpu_worker.forward import Forward
from gpu_worker.grammar import GrammarCompiler, GrammarMask, grammar_mask
from gpu_worker.kv_cache import TORCH_DTYPES, PagedKVCache, bytes_per_block
from gpu_worker.lm_head import StepLogits
from gpu_worker.memory_profile import CudaMemory, DeviceMemory, kv_pool_blocks, worst_case_forward
from gpu_worker.model_config import ModelConfig, load_model_config
from gpu_worker.plan_checks import PlanChecker, cpu_pool_use
from gpu_worker.rope import RotaryEmbedding
from gpu_worker.sampler import Sampler, compute_logprobs
from gpu_worker.step_batch import RequestState, Scheduled, SubBatch, layout_sub_batch, schedule
from gpu_worker.step_clock import StepClock
from gpu_worker.weights import load_weights

logger = logging.getLogger(__name__)

def config_json(model_dir: str) -> str:
    """The model's config.json, keys sorted."""
    return json.dumps(json.loads((Path(model_dir) / "config.json").read_text()), sort_keys=True)


def config_hash(model_dir: str) -> str:
    """sha256 of the model's config.json, keys sorted: a profile's model key."""
    return hashlib.sha256(config_json(model_dir).encode()).hexdigest()


def _sampling_ids(sub_batches: list[SubBatch]) -> list[str]:
    """The step's requests that sample, in the order of the forward's logits rows."""
    return [rid for batch in sub_batches for rid in batch.sampling_ids]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelRunner:
    """The gpu_worker's model: weights, KV pool, request state. Block ids come from the scheduler.

    A lost cpu_attention_worker fails the step with CpuPoolLost (see apex_serve.errors for what is dropped); the
    CPU pool is then detached until a fresh data plane is re-attached in the background, and plans that touch it
    fail with CpuPoolLost meanwhile."""

    def __init__(self, config: GpuWorkerConfig, memory: DeviceMemory | None = None) -> None:
        """memory: the device's, which sizes the KV pool (memory_profile) where num_kv_blocks is unset; None: CUDA's
        own on CUDA, and on the CPU device_kv_budget_bytes instead."""
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.model_config: ModelConfig = load_model_config(config.model_dir)
        self.dtype_name = resolve_dtype(config.dtype, self.device)
        cuda = CudaDevice.of(self.device) if self.device.type == "cuda" else None
        if cuda is not None:
            check_fits(cuda, self.dtype_name, self.model_config)
        self.dtype = TORCH_DTYPES[self.dtype_name]
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        rope = RotaryEmbedding(self.model_config, self.max_model_len, self.dtype, self.device)
        self.weights = load_weights(config.model_dir, self.model_config, self.dtype, self.device, rope)
        capability = None if cuda is None else cuda.capability
        decode = decode_kernel_for(config.decode_attention, self.device, self.dtype, self.model_config,
                                   config.block_size, capability)  # its workspace is allocated before the sizing
        per_block = bytes_per_block(self.model_config, config.block_size, self.dtype)
        num_blocks = config.num_kv_blocks or self._pool_blocks(per_block, memory)
        if num_blocks * config.block_size < self.max_model_len:
            logger.warning(
                "KV pool of %d blocks cannot hold one request of max_model_len %d", num_blocks, self.max_model_len
            )
        self.kv_cache = PagedKVCache(self.model_config, num_blocks, config.block_size, self.dtype, self.device)
        self.max_blocks_per_row = -(-self.max_model_len // config.block_size)
        graphs = None
        if config.cuda_graph_max_rows:
            graphs = DecodeGraphs(self.weights, config.cuda_graph_max_rows, capture_for(self.device))
        self.forward = Forward(self.weights, self.kv_cache, None, self.model_config.rms_norm_eps, decode, graphs)
        self.checker = PlanChecker(
            self.model_config.vocab_size, self.max_model_len, config.block_size,
            {Placement.GPU: num_blocks, Placement.CPU: 0}, config.cpu_max_rows,
        )
        self.sampler = Sampler(config.seed, self.device, self.model_config.eos_token_ids)
        self.grammars = GrammarCompiler(config.model_dir, self.model_config.vocab_size, self.model_config.eos_token_ids)
        self.grammars.warm_up()
        self._requests: dict[str, RequestState] = {}
        self._lock = threading.Lock()  # held by a step while it runs; the CPU pool's bridge changes only under it
        self._info = WorkerInfo(
            model_name=Path(config.model_dir).resolve().name,
            num_layers=self.model_config.num_hidden_layers,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.model_config.eos_token_ids,
            block_size=config.block_size,
            num_kv_blocks=num_blocks,
            device=str(self.device),
            dtype=self.dtype_name,
            hardware=self._fingerprint(),
            model_config_hash=config_hash(config.model_dir),
            model_config_json=config_json(config.model_dir),
            decode_attention=decode.name,
        )
        self.cpu_pool: CpuPool | None = None
        if config.cpu_worker_address:
            self.cpu_pool = CpuPool(
                config.cpu_worker_address, self._data_plane_spec(), self.device, self._lock,
                config.cpu_reattach_interval_s, self._cpu_pool_changed,
            )
            self.cpu_pool.attach(timeout_s=60.0)
        logger.info("model runner ready: %s, %d accelerator KV blocks, %d CPU KV blocks", self._info.model_name,
                    num_blocks, self._info.num_cpu_kv_blocks)

    def _fingerprint(self) -> HardwareFingerprint:
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return fingerprint(props.name, props.total_memory)
        return fingerprint()

    def _data_plane_spec(self) -> DataPlaneSpec:
        """The data plane asked of the cpu_attention_worker (it creates the shared-memory regions for this model)."""
        config, model = self.config, self.model_config
        return DataPlaneSpec(
            num_layers=model.num_hidden_layers,
            num_q_heads=model.num_attention_heads,
            num_kv_heads=model.num_key_value_heads,
            head_dim=model.head_dim,
            block_size=config.block_size,
            num_blocks=config.cpu_num_kv_blocks,
            kv_dtype=self.dtype_name if config.cpu_kv_dtype == "auto" else config.cpu_kv_dtype,
            max_rows=config.cpu_max_rows,
            max_blocks_per_row=self.max_blocks_per_row,
        )

    def _cpu_pool_changed(self, bridge: CpuAttentionBridge | None) -> None:
        """Point the forward, the plan checker and WorkerInfo at the data plane attached now (None: detached; the
        info keeps the geometry of the last plane)."""
        self.forward.bridge = bridge
        if bridge is None:
            self.checker.pool_blocks[Placement.CPU] = 0
            self._info = replace(self._info, cpu_pool_attached=False)
            return
        self.checker.pool_blocks[Placement.CPU] = bridge.pool.num_blocks
        self._info = replace(
            self._info,
            num_cpu_kv_blocks=bridge.pool.num_blocks,
            cpu_kv_dtype=bridge.spec.kv_dtype,
            cpu_max_rows=bridge.spec.max_rows,
            bytes_per_cpu_row=bridge.bytes_per_row(),
            cpu_pool_attached=True,
            cpu_pool_generation=self._info.cpu_pool_generation + 1,
        )

    def _pool_blocks(self, per_block: int, memory: DeviceMemory | None) -> int:
        config = self.config
        if memory is None and self.device.type == "cuda":
            memory = CudaMemory(self.device)
        if memory is not None:
            return kv_pool_blocks(memory, config.gpu_memory_utilization, per_block, lambda: worst_case_forward(
                self.weights, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
                self.model_config.rms_norm_eps, self.device))
        if config.device_kv_budget_bytes < per_block:
            raise ValueError(
                f"device_kv_budget_bytes: {config.device_kv_budget_bytes} is under one block ({per_block} bytes)"
            )
        return config.device_kv_budget_bytes // per_block

    @property
    def info(self) -> WorkerInfo:
        return self._info

    @property
    def bridge(self) -> CpuAttentionBridge | None:
        """The data plane attached now; None without a cpu_attention_worker or while it is lost."""
        return self.cpu_pool.bridge if self.cpu_pool else None

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step and sample one token per request whose scheduled tokens reach the end of its tokens (with
        logprobs where asked for); a non-final chunk of a prefill samples nothing. A request that asks for prompt
        logprobs gets those of the prompt tokens its prefill positions in the step predict (none when recomputed)."""
        with self._lock:
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> StepOutput:
        start_unix_ns = time.time_ns()
        start = time.perf_counter_ns()
        clock = self._clock(plan.record_subtasks)
        busy_before = self.bridge.busy_ns() if self.bridge else 0
        sub_batches = self._prepare(plan, clock)
        prepared = time.perf_counter_ns()
        if not sub_batches:
            self._flush_swaps()
            self._synchronize()
            clock.resolve()
            timings = StepTimings(
                prepare_ns=prepared - start, total_ns=prepared - start, swap_ns=clock.ns["swap"],
                start_unix_ns=start_unix_ns,
            )
            return StepOutput(step_id=plan.step_id, timings=timings)
        step_logits = self._forward(plan, sub_batches, clock)
        request_ids = _sampling_ids(sub_batches)
        requests = [self._requests[rid] for rid in request_ids]
        grammar = self._grammar_mask(requests)  # host work: on CUDA it runs while the device computes the forward
        self._synchronize()
        forwarded = time.perf_counter_ns()
        clock.resolve()
        sampled, logprobs = self._sample(request_ids, requests, step_logits.logits, grammar)
        done = time.perf_counter_ns()
        timings = StepTimings(
            prepare_ns=prepared - start,
            forward_ns=forwarded - prepared,
            sample_ns=done - forwarded,
            total_ns=done - start,
            swap_ns=clock.ns["swap"],
            device_linear_ns=clock.ns["device_linear"],
            device_attention_ns=clock.ns["device_attention"],
            staging_ns=clock.ns["staging"],
            wait_ns=clock.ns["wait"],
            cpu_attention_ns=(self.bridge.busy_ns() - busy_before) if self.bridge else 0,
            start_unix_ns=start_unix_ns,
        )
        return StepOutput(
            step_id=plan.step_id, sampled=sampled, timings=timings, logprobs=logprobs, subtasks=clock.subtasks_unix(),
            prompt_logprobs=step_logits.prompt_logprobs,
        )

    def compute_logits(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        """Run one step without sampling: fp32 logits [vocab] of the last position of each request that would
        sample in it."""
        with self._lock:
            clock = StepClock()
            sub_batches = self._prepare(plan, clock)
            if not sub_batches:
                self._flush_swaps()
                return {}
            logits = self._forward(plan, sub_batches, clock).logits  # [num_sampling, vocab]
            return dict(zip(_sampling_ids(sub_batches), logits.unbind(0)))

    def sample(self, logits: dict[str, torch.Tensor]) -> dict[str, int]:
        """Sample from compute_logits' output and append each token to its request, as execute does;
        logprobs reach only execute's StepOutput."""
        with self._lock:
            request_ids = list(logits)
            requests = [self._requests[rid] for rid in request_ids]
            stacked = torch.stack(list(logits.values()))  # [num_sampling, vocab]
            return self._sample(request_ids, requests, stacked, self._grammar_mask(requests))[0]

    def reset(self) -> int:
        """Drop the state of every request (a scheduler starting anew); how many were dropped."""
        with self._lock:
            dropped = len(self._requests)
            self._requests.clear()
        logger.info("reset: dropped the state of %d requests", dropped)
        return dropped

    def close(self) -> None:
        """Stop re-attaching and detach from the cpu_attention_worker's shared memory."""
        if self.cpu_pool is not None:
            self.cpu_pool.close()

    def _forward(self, plan: StepPlan, sub_batches: list[SubBatch], clock: StepClock) -> StepLogits:
        """The forward's logits [num_sampling, vocab] and prompt logprobs; CpuPoolLost when the cpu_attention_worker
        is lost in it. Only once it succeeded do the scheduled requests count their tokens as computed."""
        wait_s = plan.cpu_wait_timeout_s if plan.cpu_wait_timeout_s > 0 else self.config.cpu_wait_timeout_s
        try:
            logits = self.forward.logits(sub_batches, plan.mode, plan.layout, clock, wait_s)
        except CpuAttentionError as exc:
            raise self._lose(plan, str(exc)) from exc
        for batch in sub_batches:
            for scheduled in batch.scheduled:
                self._requests[scheduled.request_id].num_computed_tokens = scheduled.end
        return logits

    def _lose(self, plan: StepPlan, cause: str) -> CpuPoolLost:
        """After a loss in the forward of plan (fully prepared): drop and undo per CpuPoolLost, detach the CPU pool
        and start re-attaching it."""
        dropped = drop_lost_requests(plan, self._requests)
        address = self.config.cpu_worker_address
        if self.cpu_pool is not None:
            self.cpu_pool.detach()
        logger.warning("lost the cpu_attention_worker at %s in step %d: %s; dropped %d requests, re-attaching every "
                       "%s s", address, plan.step_id, cause, dropped, self.config.cpu_reattach_interval_s)
        return CpuPoolLost(f"step {plan.step_id} lost the cpu_attention_worker at {address}: {cause}")

    def _grammar_mask(self, requests: list[RequestState]) -> GrammarMask | None:
        """The next-token mask of the requests that have a structured_grammar, in their order."""
        return grammar_mask([r.grammar for r in requests], self.grammars.num_words)

    def _sample(
        self, request_ids: list[str], requests: list[RequestState], logits: torch.Tensor, grammar: GrammarMask | None
    ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Tokens of logits [num_sampling, vocab] for requests (the states of request_ids; one with a
        structured_grammar within grammar, the mask of their constrained rows, and the token then consumed by its
        matcher), and logprobs of the requests that ask for them."""
        if not request_ids:
            return {}, {}
        params = [r.sampling for r in requests]
        tokens = self.sampler.sample(
            logits, params, [r.num_output_tokens for r in requests], [r.token_ids for r in requests], grammar
        )
        logprobs = compute_logprobs(logits, params, tokens)
        for request, token in zip(requests, tokens):
            request.token_ids.append(token)
            if request.grammar is not None:
                request.grammar.consume(token)
        return dict(zip(request_ids, tokens)), {request_ids[i]: lp for i, lp in logprobs.items()}

    def _clock(self, record: bool) -> StepClock:
        """The step's clock, timing the device's work (step_clock's docstring)."""
        if self.device.type != "cuda":
            return StepClock(record)
        if record:
            return StepClock(record, self._synchronize)
        return StepClock(events=partial(torch.cuda.Event, enable_timing=True))

    def _flush_swaps(self) -> None:
        """The swapped-out blocks in the CPU pool before a step without a forward ends (the forward flushes its own)."""
        if self.bridge is not None:
            self.bridge.flush()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prepare(self, plan: StepPlan, clock: StepClock) -> list[SubBatch]:
        """Apply the plan's state changes (after validating all of them) and lay out its non-empty sub-batches.
        A plan that uses the CPU pool while it is detached fails with CpuPoolLost with only its frees applied."""
        for request_id in plan.freed_request_ids:
            self._requests.pop(request_id, None)
        if self.cpu_pool is not None and self.cpu_pool.bridge is None:
            use = cpu_pool_use(plan, self._requests)
            if use:
                raise CpuPoolLost(f"step {plan.step_id}: {use}, but the CPU pool is detached (the cpu_attention_worker "
                                  f"at {self.config.cpu_worker_address} was lost; re-attaching)")
        self.checker.check(plan, self._requests)
        if plan.swap_out or plan.swap_in:
            with clock.measure("swap"):
                self._swap(plan.swap_out, plan.swap_in)
        by_slot: list[list[Scheduled]] = [[], []]
        for new in plan.new_requests:
            state = RequestState(
                token_ids=list(new.token_ids),
                num_prompt_tokens=len(new.token_ids) - new.num_output_tokens,
                sampling=new.sampling,
                block_ids=list(new.block_ids),
                placement=new.placement,
                num_prefill_tokens=len(new.token_ids),
            )
            if new.sampling.structured_grammar:
                state.grammar = self.grammars.start(
                    new.request_id, new.sampling.structured_grammar, new.token_ids[state.num_prompt_tokens:]
                )
            self._requests[new.request_id] = state
            by_slot[new.sub_batch].append(schedule(new.request_id, state, new.num_scheduled_tokens, new=True))
        for cached in plan.cached_requests:
            state = self._requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            by_slot[cached.sub_batch].append(
                schedule(cached.request_id, state, cached.num_scheduled_tokens, new=False)
            )
        return [
            layout_sub_batch(slot, scheduled, self._requests, self.config.block_size, self.max_blocks_per_row,
                             self.device)
            for slot, scheduled in enumerate(by_slot) if scheduled
        ]

    def _swap(self, swap_out: tuple[SwapData, ...], swap_in: tuple[SwapData, ...]) -> None:
        """Copy the requests' cached blocks to the other pool, all at once (a swap may take blocks another leaves),
        and move them there."""
        bridge = self.bridge
        if bridge is None:
            raise RuntimeError("a swap uses the CPU pool but no cpu_attention_worker is attached")

        def move(swap: SwapData) -> BlockMove:  # the request's cached blocks, and the request moved
            request = self._requests[swap.request_id]
            count = -(-request.num_cached_tokens // self.config.block_size)
            blocks = (request.block_ids[:count], list(swap.block_ids[:count]))
            request.block_ids = list(swap.block_ids)
            request.placement = request.placement.other
            return blocks

        bridge.swap(self.kv_cache, [move(s) for s in swap_out], [move(s) for s in swap_in])
