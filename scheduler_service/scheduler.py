"""The gpu-only policy: FCFS, continuous batching, no chunked prefill, preemption by recompute."""

import logging
from collections import deque
from collections.abc import Sequence

from apex_serve.errors import InvalidArgument, ResourceExhausted
from apex_serve.types import (
    CachedRequestData,
    FinishReason,
    NewRequestData,
    RequestOutput,
    SamplingParams,
    StepOutput,
    StepPlan,
    WorkerInfo,
)
from scheduler_service.block_manager import BlockManager
from scheduler_service.config import SchedulerConfig
from scheduler_service.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class Scheduler:
    """Plans one engine step at a time: schedule(), the worker runs the plan, update_from_output().

    Each step every running request decodes one token, oldest first; one that needs a block when the
    pool is empty preempts the most recently admitted running request (its blocks are freed and it
    waits at the front of the queue to be prefilled again). Then waiting requests are admitted in FCFS
    order, each prefilling all its known tokens, until the first that does not fit. One plan may be in
    flight: update it, or abort its requests if the step failed, before the next schedule().
    """

    def __init__(self, config: SchedulerConfig, worker: WorkerInfo) -> None:
        self.config = config
        self._max_model_len = worker.max_model_len
        self._vocab_size = worker.vocab_size
        self._eos_token_ids = frozenset(worker.eos_token_ids)
        self._blocks = BlockManager(worker.num_kv_blocks, worker.block_size)
        self._requests: dict[str, Request] = {}  # waiting and running, by id
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order, the most recent last
        self._freed_ids: list[str] = []  # worker state the next plan drops
        self._in_flight: list[Request] = []  # scheduled by the plan awaiting update_from_output
        self._in_flight_step: int | None = None
        self._next_step_id = 0
        self._num_steps = 0
        self._num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_blocks(self) -> int:
        return self._blocks.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self._blocks.num_total_blocks

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    @property
    def num_steps(self) -> int:
        """Plans that ran at least one request."""
        return self._num_steps

    def has_work(self) -> bool:
        """True while schedule() returns a plan worth sending: requests to run or worker state to drop."""
        return bool(self._waiting or self._running or self._freed_ids)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Queue a request; InvalidArgument if it can never run, ResourceExhausted if the queue is full."""
        prompt = tuple(prompt_token_ids)
        self._validate(request_id, prompt, sampling)
        if len(self._waiting) >= self.config.max_queued_requests:
            raise ResourceExhausted(
                f"{len(self._waiting)} requests are waiting (max_queued_requests {self.config.max_queued_requests})"
            )
        request = Request(request_id, prompt, sampling)
        self._requests[request_id] = request
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its blocks now; False if unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request)
        logger.debug("aborted %s after %d output tokens", request_id, request.num_output_tokens)
        return True

    def schedule(self) -> StepPlan:
        """The next step: decodes of the running requests, then prefills of admitted ones.

        A request preempted here is not re-admitted in the same step: it needs at least the blocks it
        freed, and the request that preempted it took one of them (or, preempting itself, needs one more).
        """
        if any(r.status is RequestStatus.RUNNING for r in self._in_flight):
            raise RuntimeError(f"step {self._in_flight_step} is in flight: call update_from_output() first")
        cached = self._schedule_decodes()
        new = self._admit(len(cached))
        plan = StepPlan(
            step_id=self._next_step_id,
            new_requests=tuple(new),
            cached_requests=tuple(cached),
            freed_request_ids=tuple(self._freed_ids),
        )
        self._next_step_id += 1
        self._freed_ids = []
        self._in_flight = list(self._running)
        self._in_flight_step = plan.step_id
        if not plan.is_empty:
            self._num_steps += 1
        return plan

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> list[RequestOutput]:
        """Append each sampled token, finish requests on a stop token or a length limit, report per request.

        Tokens of requests aborted since the plan was made are dropped. A request that asked for logprobs
        gets its token's in RequestOutput.logprobs.
        """
        if plan.step_id != self._in_flight_step or output.step_id != plan.step_id:
            raise ValueError(
                f"step_id: output {output.step_id} of plan {plan.step_id}, but step {self._in_flight_step} is in flight"
            )
        live = [r for r in self._in_flight if r.status is RequestStatus.RUNNING]
        missing = [r.request_id for r in live if r.request_id not in output.sampled]
        unplanned = sorted(output.sampled.keys() - {r.request_id for r in self._in_flight})
        if missing or unplanned:
            raise ValueError(f"sampled: step {plan.step_id} lacks tokens of {missing}, has tokens of {unplanned}")
        no_logprobs = [
            r.request_id for r in live if r.sampling.logprobs is not None and r.request_id not in output.logprobs
        ]
        if no_logprobs:
            raise ValueError(f"logprobs: step {plan.step_id} lacks the logprobs of {no_logprobs}")
        self._in_flight = []
        self._in_flight_step = None
        outputs = []
        for request in live:
            token = output.sampled[request.request_id]
            logprob = output.logprobs.get(request.request_id)
            request.output_token_ids.append(token)
            reason = self._finish_reason(request, token)
            if reason is not None:
                self._finish(request)
            outputs.append(
                RequestOutput(
                    request_id=request.request_id,
                    new_token_ids=(token,),
                    finished=reason is not None,
                    finish_reason=reason,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_output_tokens=request.num_output_tokens,
                    logprobs=() if logprob is None else (logprob,),
                )
            )
        return outputs

    def _validate(self, request_id: str, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        if not request_id:
            raise InvalidArgument("request_id", "must not be empty")
        if request_id in self._requests:
            raise InvalidArgument("request_id", f"{request_id!r} is already waiting or running")
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty")
        bad = next((t for t in prompt if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidArgument("prompt", f"token id {bad} is outside the vocabulary [0, {self._vocab_size})")
        limit = min(self._max_model_len - 1, self.config.max_num_batched_tokens)
        if len(prompt) > limit:
            raise InvalidArgument(
                "prompt",
                f"{len(prompt)} tokens; the limit is {limit} (context length {self._max_model_len} less one "
                f"for output, max_num_batched_tokens {self.config.max_num_batched_tokens})",
            )
        # KV of every token but the last generated one, within the context length
        peak = min(len(prompt) + sampling.max_tokens, self._max_model_len) - 1
        pool = self._blocks.num_total_blocks * self._blocks.block_size
        if peak > pool:
            raise InvalidArgument(
                "prompt" if len(prompt) > pool else "max_tokens",
                f"{len(prompt)} prompt tokens and max_tokens {sampling.max_tokens} need KV for {peak} tokens; "
                f"the whole KV pool holds {pool}",
            )

    def _schedule_decodes(self) -> list[CachedRequestData]:
        """One decode slot for every running request that keeps its place, oldest first."""
        queue = deque(self._running)
        self._running = []
        cached = []
        while queue:
            request = queue.popleft()
            kv_len = request.num_tokens - 1  # the last sampled token is not in the KV cache yet
            if not self._make_room(request, kv_len, queue):
                continue
            new_block_ids = self._blocks.append_slot(kv_len)
            request.block_ids.extend(new_block_ids)
            self._running.append(request)
            cached.append(CachedRequestData(request.request_id, tuple(new_block_ids)))
        return cached

    def _make_room(self, request: Request, kv_len: int, younger: deque[Request]) -> bool:
        """Preempt the youngest running requests until request can append; False if it preempted itself."""
        while self._blocks.blocks_needed_to_append(kv_len) > self._blocks.num_free_blocks:
            victim = younger.pop() if younger else request
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self._blocks.free(request.block_ids)
        request.block_ids = []
        request.status = RequestStatus.WAITING
        self._drop_from_worker(request)
        self._waiting.appendleft(request)
        self._num_preemptions += 1
        logger.debug("preempted %s at %d tokens", request.request_id, request.num_tokens)

    def _admit(self, num_tokens: int) -> list[NewRequestData]:
        """Admit waiting requests in FCFS order, each prefilling all its tokens, until one does not fit."""
        new = []
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            n = request.num_tokens
            # a resumed request may exceed the token budget: it then runs in a step of its own
            if num_tokens > 0 and num_tokens + n > self.config.max_num_batched_tokens:
                break
            if not self._blocks.can_allocate(n):
                break
            self._waiting.popleft()
            request.block_ids = self._blocks.allocate(n)
            request.status = RequestStatus.RUNNING
            request.on_worker = True
            self._running.append(request)
            new.append(
                NewRequestData(
                    request_id=request.request_id,
                    token_ids=request.token_ids,
                    sampling=request.sampling,
                    block_ids=tuple(request.block_ids),
                    num_output_tokens=request.num_output_tokens,
                )
            )
            num_tokens += n
        return new

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        """STOP on a stop token or EOS only past min_tokens (the worker should not sample one before)."""
        sampling = request.sampling
        if token in sampling.stop_token_ids or (token in self._eos_token_ids and not sampling.ignore_eos):
            if request.num_output_tokens > sampling.min_tokens:
                return FinishReason.STOP
            logger.warning(
                "%s: stop token %d as output token %d of min_tokens %d does not finish it",
                request.request_id, token, request.num_output_tokens, sampling.min_tokens,
            )
        if request.num_output_tokens >= sampling.max_tokens or request.num_tokens >= self._max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request) -> None:
        """Remove a finished or aborted request and free its blocks."""
        if request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        else:
            self._running.remove(request)
        self._blocks.free(request.block_ids)
        request.block_ids = []
        request.status = RequestStatus.FINISHED
        self._drop_from_worker(request)
        del self._requests[request.request_id]

    def _drop_from_worker(self, request: Request) -> None:
        if request.on_worker:
            self._freed_ids.append(request.request_id)
            request.on_worker = False
