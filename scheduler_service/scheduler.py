"""The scheduler core: pure Python, no tensors, no gRPC. schedule() plans one iteration, the worker runs it,
update_from_output() takes its tokens. A policy (scheduler_service.policies) picks each iteration's execution mode and
CPU decode rows; this module keeps the queues and both KV pools (scheduler_service.kv_manager) consistent, and
scheduler_service.decode_slots gives each decoding request its slot.

An iteration computes at most max_num_batched_tokens tokens: a decode row counts one, a prefill chunk its tokens
(scheduler_service.prefill: vLLM v1's chunked prefill). Each schedule():
1. swap-in (hybrid policies): CPU requests move to the accelerator, ahead of the waiting requests, while one sits out
   or nothing waits, or under a policy's swap_in_occupancy (scheduler_service.swap_in says which and why);
2. every accelerator-resident request decodes, oldest first; one that needs a block when the pool is empty evicts
   the youngest: swapped out to the CPU pool by hybrid policies where step 3's CPU test passes, else preempted
   (freed, recomputed later); a request still prefilling is never a victim;
3. the budget those rows leave, less a token for each CPU request one step may stage (the policy's CPU rows), goes
   first to the requests still prefilling, FCFS, each its next chunk of min(tokens left, budget left); then waiting
   requests are admitted FCFS, each with the blocks of all its known tokens and a first chunk, while fewer than
   max_num_seqs run on the two pools together and budget is left, until the first that does not fit; while requests
   wait, the requests still prefilling and the prompts longer than the policy's chunk_tokens (apex: the ridge of the
   step's decode work) that the pools could not take with the request behind them share at most that many tokens,
   so that long prompts are spread over steps that each carry the decode rows while the pools are full (a prompt
   within it, or with room behind it, is admitted whole):
   under a hybrid policy on the CPU, without more ado, if its peak KV (prompt + max_tokens) exceeds the accelerator's
   whole pool and fits beside what the CPU's requests have reserved (it can run nowhere else); else on the
   accelerator if its tokens fit (as vLLM does); else, under a hybrid policy, on the CPU if its peak KV fits beside
   what the CPU's requests have reserved and the policy predicts more tokens/s with CPU rows for it and the requests
   queued behind it, at their mean context over their lives, beside the accelerator rows its pool sustains (CPU rows
   must pay for themselves) and, under a TPOT objective, the steady decode iterations keep it;
4. the policy chooses the mode, the overlap layout and how many CPU-resident requests (least recently decoded first)
   decode, within the latency objectives (scheduler_service.objectives; the iterations each candidate sat out and the
   predicted waits of scheduler_service.latency_clock tell it what they need); a request whose chunk reaches the end
   of its tokens samples its first token and joins its pool's decode requests.
The plan carries a request in full once (NewRequestData, with its first chunk), then only what changed (new block ids,
sub-batch, the next chunk); only the requests whose scheduled tokens reach the end of their tokens sample. Every
sample_layers_every-th plan asks the workers for per-layer subtask intervals. Until update_from_output() the plan is
in flight (scheduler_service.in_flight): its requests, the policy's choice and the iteration's record. A plan with CPU
work gives its CPU rows a deadline; if the worker loses the CPU pool, cpu_pool_lost() requeues what lived there and
retries the rest on the accelerator, which alone serves until cpu_pool_restored() (scheduler_service.cpu_pool).
"""

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from itertools import count, islice
from operator import attrgetter

from apex_serve.engine_stats import IterationRecord, SchedulerStats
from apex_serve.errors import InvalidArgument, ResourceExhausted
from apex_serve.types import (
    Placement,
    SamplingParams,
    StepOutput,
    StepPlan,
    SwapData,
    WorkerInfo,
)
from scheduler_service.admission import Admission
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ComposedCostModel
from scheduler_service.cpu_placement import CpuPlacement
from scheduler_service.cpu_pool import Retry, cpu_deadline_s, lost_with_cpu_pool
from scheduler_service.cpu_queue import must_run, prefix_contexts, sat_out, to_back
from scheduler_service.decision import Candidates, Choice, Policy
from scheduler_service.decode_slots import grow_cpu_rows, grow_gpu_rows
from scheduler_service.in_flight import Flights, InFlightStep, IterationLog, StepResult
from scheduler_service.kv_manager import KVManager
from scheduler_service.latency_clock import PredictedClock
from scheduler_service.policies import LatencyObjective, make_policy
from scheduler_service.prefill import Chunk, ChunkShape, Prefilling
from scheduler_service.request import Request, RequestStatus
from scheduler_service.request_limits import RequestLimits
from scheduler_service.swap_in import swap_in_choice

logger = logging.getLogger(__name__)
RECENT_ITERATIONS = 256


class Scheduler:
    """Two plans may be in flight: the one whose step runs and one planned ahead of its output (asynchronous
    scheduling). Each is updated with its step's output in order, or, if its step failed, its requests are aborted
    (or cpu_pool_lost() answered if the worker lost its CPU pool in it), the plan made ahead of it withdrawn first.
    A plan made ahead first counts each token the step before samples as pending (InFlightStep.hold): the blocks it
    grows hold that token, and a request whose pending token reaches its peak is left out (that token finishes it).
    Finishes, stops and aborts found in a step's output reach the worker in the next plan made after it."""

    def __init__(self, config: SchedulerConfig, worker: WorkerInfo, cost_model: ComposedCostModel | None = None,
                 policy: Policy | None = None) -> None:
        """policy: one to run in place of the one config.policy names (the simulator's variants of it)."""
        self.config = config
        self.policy = policy or make_policy(config.policy, cost_model, LatencyObjective.of(config))
        if self.policy.uses_cpu and not (worker.num_cpu_kv_blocks and worker.cpu_max_rows):
            raise ValueError(f"policy: {config.policy!r} places requests on the CPU, but the gpu_worker has no "
                             "cpu_attention_worker (0 CPU KV blocks or cpu_max_rows)")
        self.cost_model = cost_model
        self._kv = KVManager(worker.num_kv_blocks, 0, worker.block_size)
        self._prefilling = Prefilling()  # admitted requests whose prefill is not yet scheduled to its end
        self._attach(worker)
        pool = max(Placement, key=self._kv.num_total)
        name = "the accelerator's" if pool is Placement.GPU else "the CPU's"
        self.limits = RequestLimits(
            worker.vocab_size, worker.max_model_len, self._kv.num_total(pool) * worker.block_size,
            f"{name} ({self._kv.num_total(pool)} blocks of {worker.block_size} tokens)",
            frozenset(worker.eos_token_ids),
        )
        self._requests: dict[str, Request] = {}  # waiting and running, by id
        self._waiting: deque[Request] = deque()
        self._gpu_running: list[Request] = []  # accelerator-resident running requests, the most recently placed last
        self._cpu_queue: deque[Request] = deque()  # CPU-resident running requests, least recently decoded first
        self._freed_ids: list[str] = []  # worker state the next plan drops
        self._flights = Flights()
        self._next_step_id = 0
        self._num_preemptions = 0
        self._num_swaps = 0
        self._iterations = IterationLog(RECENT_ITERATIONS)
        self._arrivals = count()
        self._cpu_pool_losses = 0
        self._clock = PredictedClock()

    @property
    def running(self) -> list[Request]:
        """The running requests: the accelerator's decoding ones, the CPU's, then those still prefilling."""
        return self._gpu_running + list(self._cpu_queue) + list(self._prefilling)

    @property
    def in_flight(self) -> InFlightStep | None:
        """The latest plan until update_from_output() takes its step's output."""
        return self._flights.latest

    def stats(self) -> SchedulerStats:
        """A snapshot of the queues, both KV pools and the iteration counts."""
        kv = self._kv
        return SchedulerStats(
            policy=self.config.policy,
            num_running=self._num_running,
            num_running_cpu=len(self._cpu_queue) + len(self._prefilling.on(Placement.CPU)),
            num_waiting=len(self._waiting),
            free_blocks={p: kv.num_free(p) for p in Placement},
            total_blocks={p: kv.num_total(p) for p in Placement},
            num_preemptions=self._num_preemptions,
            num_swaps=self._num_swaps,
            iterations_by_mode=dict(self._iterations.by_mode),
            iterations_by_layout=dict(self._iterations.by_layout),
            recent_iterations=tuple(self._iterations.recent),
            cost_model_error={} if self.cost_model is None else self.cost_model.error_stats(),
            cpu_pool_degraded=self.cpu_pool_degraded,
            cpu_pool_losses=self._cpu_pool_losses,
        )

    @property
    def _num_running(self) -> int:
        return len(self._gpu_running) + len(self._cpu_queue) + len(self._prefilling)

    def has_work(self) -> bool:
        """True while schedule() returns a plan worth sending: requests to run or worker state to drop."""
        return bool(self._waiting or self._gpu_running or self._cpu_queue or self._prefilling or self._freed_ids)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Queue a request; InvalidArgument if it can never run, ResourceExhausted if the queue is full."""
        if not request_id:
            raise InvalidArgument("request_id", "must not be empty")
        if request_id in self._requests:
            raise InvalidArgument("request_id", f"{request_id!r} is already waiting or running")
        request = self.limits.new_request(request_id, prompt_token_ids, sampling)
        if len(self._waiting) >= self.config.max_queued_requests:
            raise ResourceExhausted(
                f"{len(self._waiting)} requests are waiting (max_queued_requests {self.config.max_queued_requests})"
            )
        request.arrival = next(self._arrivals)
        self._clock.arrive(request_id)
        self._requests[request_id] = request
        self._waiting.append(request)

    def request_ids(self) -> list[str]:
        """Every waiting and running request's id."""
        return list(self._requests)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its blocks now; False if unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request)
        logger.debug("aborted %s after %d output tokens", request_id, request.num_output_tokens)
        return True

    def schedule(self) -> StepPlan:
        """The next iteration (see the module docstring). A request preempted here is not re-admitted in the same
        step: it needs at least the blocks it freed, and the request that preempted it took one of them."""
        running = self._flights.running()
        if len(running) > 1:
            raise RuntimeError(f"steps {running[0].step_id} and {running[1].step_id} are in flight: call "
                               "update_from_output() first")
        ahead = bool(running)  # planned before that step's output is known
        for flight in running:
            flight.hold()  # its tokens count from now on: the blocks grown here hold them
        preemptions = self._num_preemptions
        swap_in = self._swap_in()
        swap_out: list[SwapData] = []
        gpu = [r for r in self._gpu_running if not r.done_when_known] if ahead else self._gpu_running[:]
        gpu_rows, cached, device = grow_gpu_rows(self._kv, gpu, lambda r: self._evict(r, swap_out))
        gpu_kv = device.kv_tokens(self.worker_info.paged_decode)
        cpu_candidates = list(islice(self._cpu_queue, 2 * self._cpu.max_rows))  # at most what one step stages
        front = len(cpu_candidates)
        cpu_candidates = [r for r in cpu_candidates if not r.done_when_known] if ahead else cpu_candidates
        budget = self.config.max_num_batched_tokens - len(gpu_rows) - len(cpu_candidates)
        context = prefix_contexts(cpu_candidates)
        forced = min(must_run(self._cpu_queue, self._cpu.max_rows, self.config.max_sit_out, self._next_step_id),
                     len(cpu_candidates))
        ridge = self.policy.chunk_tokens(Candidates([], len(gpu_rows), gpu_kv, context, forced,
                                                    self._cpu.max_rows), budget) if self._waiting else budget
        continuing = self._prefilling.continuing(ridge)
        admitted = self._admission.admit(self._waiting, budget - sum(c.tokens for c in continuing), continuing,
                                         self._gpu_running, self._cpu_queue, device, ridge)
        prefills = admitted + continuing
        chunks = ChunkShape.of(prefills)
        # the sit-outs and the waits only for the objective that weighs them
        choice = self.policy.choose(Candidates(
            chunks.lens, len(gpu_rows), gpu_kv, context, forced, self._cpu.max_rows, chunks.contexts,
            chunks.loaded_tokens, sat_out(cpu_candidates, self._next_step_id) if self.config.tpot_slo_ms else (),
            self._clock.first_token_waits(prefills, self._waiting, max(1, ridge)) if self.config.ttft_slo_ms
            else ()))
        self._clock.advance(choice.estimate_ns)
        cached += [c.delta() for c in continuing]  # sub-batch 0, with the accelerator rows
        chosen = cpu_candidates[: choice.cpu_rows]
        cpu_rows = grow_cpu_rows(self._kv, chosen, choice.cpu_rows_in_sub_batch_1, self._next_step_id, cached,
                                 self._preempt)
        # the rotation: those that decoded go to the back (the chosen were the queue's front unless some were left out)
        to_back(self._cpu_queue, cpu_rows, len(chosen) if len(cpu_candidates) == front else -1)
        joined = self._prefilled(continuing + admitted)  # in order of admission
        step_id = self._next_step_id
        scheduled = [c.request for c in admitted] + gpu_rows + [c.request for c in continuing] + cpu_rows
        cpu_chunks = sum(c.request.placement is Placement.CPU for c in prefills)
        record = IterationRecord(
            step_id=step_id, mode=choice.mode, num_prefills=len(admitted) + len(continuing), gpu_rows=len(gpu_rows),
            cpu_rows=len(cpu_rows), cpu_sat_out=len(self._cpu_queue) - len(cpu_rows) - joined,
            swaps_out=len(swap_out), swaps_in=len(swap_in), preemptions=self._num_preemptions - preemptions,
            prefill_tokens=sum(chunks.lens), layout=choice.layout,
        ) if scheduled else None
        partial = frozenset(c.request for c in prefills if not c.last)
        self._start(scheduled, choice, record, partial)
        return StepPlan(
            step_id=step_id,
            new_requests=tuple(c.new_data() for c in admitted),
            cached_requests=tuple(cached),
            freed_request_ids=self._take_freed(),
            mode=choice.mode,
            layout=choice.layout,
            swap_out=tuple(swap_out),
            swap_in=tuple(swap_in),
            record_subtasks=self._sampled(step_id, scheduled),
            cpu_wait_timeout_s=cpu_deadline_s(self.config, choice.estimate_ns) if cpu_rows or cpu_chunks else 0.0,
            planned_ahead=ahead,
        )

    def cpu_pool_lost(self, plan: StepPlan) -> StepPlan:
        """The gpu_worker lost its CPU pool in `plan`'s step (errors.CpuPoolLost, whose contract this keeps): the
        requests of the CPU pool (those still prefilling there among them) and those the plan swapped are requeued for
        recompute (FCFS by arrival), the CPU pool is unusable until cpu_pool_restored(), and the returned GPU_ONLY
        plan, now in flight, runs the step's accelerator part again (an accelerator request's prefill chunk too: the
        worker did not advance it). Degraded, a request whose KV fits only the CPU pool waits; those behind it pass."""
        flight = self._flights.take_latest(plan, " (withdraw() the one made ahead of it first)")
        flight.release()  # the retry samples those tokens again
        requeued = lost_with_cpu_pool(plan, self._gpu_running, [*self._cpu_queue, *self._prefilling.on(Placement.CPU)])
        for request in requeued:
            self._requeue(request)
        self._waiting = deque(sorted([*requeued, *self._waiting], key=attrgetter("arrival")))
        self._detach_cpu_pool()
        self._cpu_pool_losses += 1
        preemptions = len(requeued) + self._iterations.withdraw(flight.record)  # the retry's record replaces it
        retry = Retry.of(plan, flight.requests, flight.partial)
        step_id = self._next_step_id
        candidates = retry.candidates(self._cpu.max_rows, self.worker_info.paged_decode)
        self._start(retry.requests, self.policy.choose(candidates), retry.record(step_id, preemptions), retry.partial)
        logger.info("CPU pool lost in step %d: %d requests requeued, %d run again in step %d", plan.step_id,
                    len(requeued), len(retry.requests), step_id)
        return retry.plan(step_id, self._take_freed(), self._sampled(step_id, retry.requests))

    def cpu_pool_restored(self, info: WorkerInfo, cost_model: ComposedCostModel | None = None) -> None:
        """The gpu_worker attached a CPU pool again (info): its blocks, all free, take requests again. cost_model: one
        for its profile where that differs from the current model's (None: keep the model)."""
        if cost_model is not None:
            self.cost_model = cost_model
            self.policy = make_policy(self.config.policy, cost_model, LatencyObjective.of(self.config))
        self._attach(info)

    def worker_lost(self) -> None:
        """The gpu_worker went away with the state of every request (all aborted first): nothing to free, no plan in
        flight, and a hybrid policy's CPU pool unusable until cpu_pool_restored() (it may come back changed)."""
        if self._requests:
            raise ValueError(f"{len(self._requests)} requests are waiting or running: abort them first")
        self._freed_ids = []
        self._flights.clear()
        if self.policy.uses_cpu:
            self._detach_cpu_pool()

    def update_from_output(self, plan: StepPlan, output: StepOutput, fit_later: bool = False) -> StepResult:
        """Append each sampled token, finish requests on a stop token or a length limit, report per request, and
        complete the iteration's record with the step's timings, which also refine the cost model: here, or with
        fit_later at the next refine().

        Tokens of requests aborted since the plan was made are dropped. A request that asked for logprobs
        gets its token's in RequestOutput.logprobs, one that asked for prompt logprobs those of its prompt in its
        first RequestOutput.
        """
        flight = self._flights.oldest(plan, output)
        live, tokens = flight.live_tokens(output)
        flight.gather_prompt_logprobs(output)
        record = flight.measured(output)
        if record is not flight.record:
            self._iterations.replace(flight.record, record)
        self._flights.take_oldest(output.timings, fit_later)
        outputs = []
        add_output = outputs.append
        logprobs = output.logprobs
        for request, token in zip(live, tokens):
            out = request.take_token(token, logprobs.get(request.request_id) if logprobs else None)
            if out.finished:
                self._finish(request)
            add_output(out)
        return StepResult(tuple(outputs), record)

    def refine(self) -> None:
        """Fit the cost model to the steps update_from_output(fit_later=True) took since the last call, in order: the
        engine loop calls it while the worker runs the next step, off the path of the tokens and of the plans."""
        self._flights.refine()

    def withdraw(self, plan: StepPlan) -> int:
        """The latest plan, made ahead of a step that failed, will not run as planned: each of its requests that still
        runs is requeued for recompute (FCFS by arrival), its worker state dropped by the next plan; how many."""
        flight = self._flights.take_latest(plan)
        self._iterations.withdraw(flight.record)
        requeued = [r for r in flight.requests if r.status is RequestStatus.RUNNING]
        for request in requeued:
            self._requeue(request)
        for request in flight.requests:  # neither this step's tokens nor those of the failed step before it come
            request.drop_pending()
        self._waiting = deque(sorted([*requeued, *self._waiting], key=attrgetter("arrival")))
        logger.info("step %d withdrawn: %d requests requeued for recompute", plan.step_id, len(requeued))
        return len(requeued)

    def _swap_in(self) -> list[SwapData]:
        """Move the CPU requests scheduler_service.swap_in chooses to the accelerator (step 1 of the docstring)."""
        queue = self._cpu_queue
        if not queue:
            return []
        chosen = swap_in_choice(queue, self._gpu_running, self._prefilling, self._kv,
                                self._cpu, self._sat_out(queue[0]) > 0, bool(self._waiting),
                                self.worker_info.paged_decode, self.policy.swap_in_occupancy,
                                self.config.max_swaps_per_step)
        for request in chosen:
            queue.remove(request)
            self._gpu_running.append(request)
        self._num_swaps += len(chosen)
        return [self._kv.swap(r) for r in chosen]

    def _evict(self, request: Request, swap_out: list[SwapData]) -> None:
        """Make room on the accelerator: swap the request out where the CPU has room for it and the policy gains from
        one more CPU row, else preempt it."""
        num_cpu = len(self._cpu_queue) + len(self._prefilling.on(Placement.CPU))
        if self._cpu.takes(request, self._gpu_running, self._waiting, self._cpu_context(), num_cpu, leaving=request):
            self._gpu_running.remove(request)
            swap_out.append(self._kv.swap(request))
            self._join_cpu_queue(request)
            self._num_swaps += 1
            logger.debug("swapped %s out at %d tokens", request.request_id, request.num_tokens)
        else:
            self._preempt(request)

    def _prefilled(self, chunks: list[Chunk]) -> int:
        """The requests whose chunk reaches the end of their tokens join their pool's decode requests (they decode
        from the next step); how many joined the CPU queue."""
        joined = 0
        for chunk in chunks:
            if chunk.last:
                request = chunk.request
                if request.placement is Placement.CPU:
                    self._join_cpu_queue(request)
                    joined += 1
                else:
                    self._gpu_running.append(request)
        return joined

    def _sat_out(self, request: Request) -> int:
        """Iterations since it last decoded (or joined the CPU queue), up to the one being planned."""
        return self._next_step_id - request.last_step - 1

    def _join_cpu_queue(self, request: Request) -> None:
        request.last_step = self._next_step_id
        self._cpu_queue.append(request)

    def _preempt(self, request: Request) -> None:
        self._requeue(request)
        self._waiting.appendleft(request)
        logger.debug("preempted %s at %d tokens", request.request_id, request.num_tokens)

    def _requeue(self, request: Request) -> None:
        """Free its blocks and its state on the worker: admitted again, it recomputes its prompt and tokens so far
        (with the token of a step in flight that samples for it, once that step's output is taken)."""
        self._leave_running(request)
        self._kv.free(request)
        request.status = RequestStatus.WAITING
        self._drop_from_worker(request)
        self._num_preemptions += 1

    def _cpu_context(self) -> list[int]:
        """Prefix sums of the CPU requests' contexts, as many as one step may stage."""
        return prefix_contexts(islice(self._cpu_queue, 2 * self._cpu.max_rows))

    def _finish(self, request: Request) -> None:
        """Remove a finished or aborted request and free its blocks."""
        if request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        else:
            self._leave_running(request)
            self._kv.free(request)
        request.status = RequestStatus.FINISHED
        self._clock.forget(request.request_id)
        self._drop_from_worker(request)
        del self._requests[request.request_id]

    def _leave_running(self, request: Request) -> None:
        if request.prefilling:
            self._prefilling.remove(request)
        elif request.placement is Placement.CPU:
            self._cpu_queue.remove(request)
        else:
            self._gpu_running.remove(request)

    def _drop_from_worker(self, request: Request) -> None:
        if request.on_worker:
            self._freed_ids.append(request.request_id)
            request.on_worker = False

    def _attach(self, info: WorkerInfo) -> None:
        """The worker's CPU pool, all free, where the policy places requests on the CPU."""
        # the worker as its clients see it: under a policy that places nothing on the CPU, without a CPU pool
        self.worker_info = info if self.policy.uses_cpu else replace(info, num_cpu_kv_blocks=0)
        self._kv.set_cpu_pool(self.worker_info.num_cpu_kv_blocks)
        self._cpu = CpuPlacement(self.policy, self._kv, info.cpu_max_rows, self.config.max_sit_out)
        self._admission = Admission(self.config.max_num_seqs, self._kv, self._cpu, self._prefilling,
                                    info.paged_decode)
        self.cpu_pool_degraded = False  # the CPU pool is lost: every request runs on the accelerator until restored

    def _start(self, scheduled: list[Request], choice: Choice, record: IterationRecord | None,
               partial: frozenset[Request]) -> None:
        """Step _next_step_id goes in flight (partial: its requests whose chunk samples nothing); its record, if it
        runs a request, is counted."""
        self._iterations.add(record)
        flight = InFlightStep(self._next_step_id, scheduled, choice, record, self.cost_model, partial)
        self._flights.add(flight)
        self._next_step_id += 1

    def _take_freed(self) -> tuple[str, ...]:
        freed, self._freed_ids = tuple(self._freed_ids), []
        return freed

    def _sampled(self, step_id: int, scheduled: list[Request]) -> bool:
        every = self.config.sample_layers_every
        return bool(scheduled) and every > 0 and step_id % every == 0

    def _detach_cpu_pool(self) -> None:
        self._kv.set_cpu_pool(0)
        self.cpu_pool_degraded = True
