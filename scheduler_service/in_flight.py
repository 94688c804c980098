"""The plan awaiting its step's output: the requests it scheduled, the policy's choice, the iteration's record, and
what update_from_output checks and measures against them; and the log of the records of the plans that ran."""

import logging
from collections import Counter, deque
from dataclasses import dataclass

from apex_serve import overlap
from apex_serve.engine_stats import IterationRecord
from apex_serve.types import ExecutionMode, OverlapLayout, RequestOutput, StepOutput, StepPlan, StepTimings
from scheduler_service.cost.model import ComposedCostModel, Prediction
from scheduler_service.cost.shape import IterationShape
from scheduler_service.decision import Choice
from scheduler_service.request import Request, RequestStatus

logger = logging.getLogger(__name__)
MAX_FLIGHTS = 4  # the step that runs, the plan made ahead of it, and stale ones


@dataclass(frozen=True)
class StepResult:
    """What update_from_output made of one step: a token (or a finish) per live request, and the iteration's
    record with the step's measured time and overlap (None for a plan that ran no request)."""

    outputs: tuple[RequestOutput, ...]
    record: IterationRecord | None


class IterationLog:
    """The records of the plans that ran a request: how many per mode, and the latest ones, oldest first."""

    def __init__(self, keep: int) -> None:
        self.by_mode: Counter[ExecutionMode] = Counter()
        self.by_layout: Counter[OverlapLayout] = Counter()  # iterations with CPU rows, either hybrid mode
        self.recent: deque[IterationRecord] = deque(maxlen=keep)

    def add(self, record: IterationRecord | None) -> None:
        if record is not None:
            self.by_mode[record.mode] += 1
            if record.cpu_rows:
                self.by_layout[record.layout] += 1
            self.recent.append(record)

    def replace(self, old: IterationRecord, new: IterationRecord) -> None:
        """Put a step's measured record in place of the one made with its plan (one of the latest)."""
        recent = self.recent
        for i in range(len(recent) - 1, -1, -1):
            if recent[i] is old:
                recent[i] = new
                return

    def withdraw(self, record: IterationRecord | None) -> int:
        """Take back the latest record (a plan that did not run: its retry is recorded instead); its preemptions."""
        if record is None:
            return 0
        self.by_mode -= Counter({record.mode: 1})
        if record.cpu_rows:
            self.by_layout -= Counter({record.layout: 1})
        self.recent.pop()
        return record.preemptions


class InFlightStep:
    """One plan between schedule() and update_from_output()."""

    def __init__(self, step_id: int, requests: list[Request], choice: Choice, record: IterationRecord | None,
                 cost_model: ComposedCostModel | None, partial: frozenset[Request] = frozenset()) -> None:
        self.step_id = step_id
        self.requests = requests  # every request the plan scheduled, in plan order
        self.partial = partial  # those whose prefill chunk does not reach the end of their tokens: they sample nothing
        self.record = record  # None for a plan that runs no request
        self.choice = choice  # the policy's, as it estimated the step
        self._cost_model = cost_model
        self._prediction: Prediction | None = None
        self.held = False  # its sampling requests count its tokens as pending (hold())

    @property
    def shape(self) -> IterationShape | None:
        """The iteration in the cost model's terms (None for an empty plan)."""
        return self.choice.shape

    def prediction(self) -> Prediction | None:
        """The cost model's corrected prediction of the iteration (None without a cost model or for an empty plan):
        the one the policy decided by where it made one (a latency objective holds for it), else made on first asking,
        off schedule()'s decision path."""
        if self._cost_model is None:
            return None
        if self._prediction is None:
            shape = self.shape
            self._prediction = self.choice.prediction or (None if shape is None else self._cost_model.predict(shape))
        return self._prediction

    def hold(self) -> None:
        """Count the token each sampling request will get from the step before it is known (Request.expect_token),
        once: a plan made ahead of the step's output does so first; without one, update_from_output counts it."""
        if self.held:
            return
        self.held = True
        for request in self.sampling():
            request.expect_token()

    def release(self) -> None:
        """Forget those tokens again (the step failed and will not give them)."""
        if not self.held:
            return
        self.held = False
        for request in self.sampling():
            if request.num_pending:
                request.forget_token()

    def is_running(self) -> bool:
        """Whether a request of the plan still runs: its step's output is owed before the next plan."""
        return any(r.status is RequestStatus.RUNNING for r in self.requests)

    def sampling(self) -> list[Request]:
        """The plan's requests whose scheduled tokens reach the end of their tokens: each samples one token."""
        partial = self.partial
        return [r for r in self.requests if r not in partial] if partial else self.requests

    def live_tokens(self, output: StepOutput) -> tuple[list[Request], list[int]]:
        """The plan's sampling requests not finished or aborted since (one requeued since, preempted by a plan made
        ahead of this step's output, takes its token too: it was computed) and their tokens, checked against the step's
        output: ValueError if a token or a requested logprob is missing, a first token comes without the logprobs of
        every prompt token after the first where they were asked for, or a token belongs to a request the plan did not
        schedule to sample (a chunk that does not reach the end of its request's tokens samples nothing)."""
        sampling = self.sampling()
        live = [r for r in sampling if r.status is not RequestStatus.FINISHED]
        sampled = output.sampled
        try:
            tokens = [sampled[r.request_id] for r in live]
        except KeyError:
            tokens = []
        # the plan's ids are distinct: with none missing, a token of another request makes sampled larger than live
        if len(tokens) != len(live) or len(sampled) != len(live):
            missing = [r.request_id for r in live if r.request_id not in sampled]
            unplanned = sorted(sampled.keys() - {r.request_id for r in sampling})
            if missing or unplanned:
                raise ValueError(f"sampled: step {self.step_id} lacks tokens of {missing}, has tokens of {unplanned}")
        asking = [r for r in live if r.asks_logprobs]
        if asking:
            _check_logprobs(self.step_id, asking, output)
        return live, tokens

    def gather_prompt_logprobs(self, output: StepOutput) -> None:
        """Add the step's prompt logprobs to those of the plan's requests that still run (a request aborted since the
        plan was made drops them); a request's first output carries them."""
        if not output.prompt_logprobs:
            return
        for request in self.requests:
            logprobs = output.prompt_logprobs.get(request.request_id)
            if logprobs and request.status is not RequestStatus.FINISHED:
                request.prompt_logprobs.extend(logprobs)

    def measured(self, output: StepOutput) -> IterationRecord | None:
        """The record with the step's measured time, its overlap and the prediction (what fit() corrects the cost model
        with). A step without timings leaves the record as it was."""
        record = self.record
        measured = output.timings.total_ns
        if record is None or measured <= 0:
            return record
        prediction = self.prediction()
        record = record.measured(None if prediction is None else prediction.total_ns, float(measured),
                                 overlap.from_timings(output.timings))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d %s: %d prefills, %d+%d rows, predicted %s ns, measured %d ns", self.step_id,
                         record.mode.value, record.num_prefills, record.gpu_rows, record.cpu_rows, record.predicted_ns,
                         measured)
        return record

    def fit(self, timings: StepTimings) -> None:
        """The cost model's online correction from the step's timings, once measured() made its prediction."""
        shape, prediction = self.shape, self._prediction
        if self._cost_model is not None and shape is not None and prediction is not None and timings.total_ns > 0:
            self._cost_model.observe(shape, prediction, timings)


def _check_logprobs(step_id: int, asking: list[Request], output: StepOutput) -> None:
    """ValueError unless each request that asked for logprobs has its token's, and each that asked for prompt
    logprobs and ends its prefill has those of every prompt token after the first."""
    no_logprobs = [
        r.request_id for r in asking if r.sampling.logprobs is not None and r.request_id not in output.logprobs
    ]
    if no_logprobs:
        raise ValueError(f"logprobs: step {step_id} lacks the logprobs of {no_logprobs}")
    short = [
        r.request_id for r in asking if r.sampling.prompt_logprobs is not None and r.num_output_tokens == 0
        and len(r.prompt_logprobs) + len(output.prompt_logprobs.get(r.request_id, ())) != r.num_prompt_tokens - 1
    ]
    if short:
        raise ValueError(f"prompt_logprobs: step {step_id} ends the prefill of {short} without the logprobs of every "
                         "prompt token after the first")


class Flights:
    """The plans in flight, oldest first: the step that runs, the plan made ahead of it (asynchronous scheduling), and
    stale ones (steps that failed, plans never sent), dropped when a later step's output is taken."""

    def __init__(self) -> None:
        self._flights: deque[InFlightStep] = deque(maxlen=MAX_FLIGHTS)
        self._unfitted: list[tuple[InFlightStep, StepTimings]] = []  # taken with fit_later, for refine()

    @property
    def latest(self) -> InFlightStep | None:
        return self._flights[-1] if self._flights else None

    def add(self, flight: InFlightStep) -> None:
        self._flights.append(flight)

    def running(self) -> list[InFlightStep]:
        """Those whose output is owed before the next plan but one (InFlightStep.is_running)."""
        return [f for f in self._flights if f.is_running()]

    def oldest(self, plan: StepPlan, output: StepOutput) -> InFlightStep:
        """The plan's flight, whose step's output this is, once the stale ones before it are dropped; ValueError if
        it is not the oldest left. It stays in flight until taken (take_oldest)."""
        flights = self._flights
        while flights and flights[0].step_id < plan.step_id:
            flights.popleft()
        flight = flights[0] if flights else None
        if flight is None or plan.step_id != flight.step_id or output.step_id != plan.step_id:
            raise ValueError(f"step_id: output {output.step_id} of plan {plan.step_id}, but step "
                             f"{None if flight is None else flight.step_id} is the oldest in flight")
        return flight

    def take_oldest(self, timings: StepTimings, fit_later: bool = False) -> None:
        """The oldest out of flight, its step's timings fitted into the cost model (InFlightStep.fit) now, or with
        fit_later at the next refine()."""
        flight = self._flights.popleft()
        if fit_later:
            self._unfitted.append((flight, timings))
        else:
            flight.fit(timings)

    def refine(self) -> None:
        """Fit the steps taken with fit_later since the last call, in order."""
        unfitted, self._unfitted = self._unfitted, []
        for flight, timings in unfitted:
            flight.fit(timings)

    def take_latest(self, plan: StepPlan, hint: str = "") -> InFlightStep:
        """The plan's flight out of flight; ValueError unless it is the latest."""
        flight = self.latest
        if flight is None or plan.step_id != flight.step_id:
            raise ValueError(f"step_id: plan {plan.step_id} is not the latest in flight{hint}")
        return self._flights.pop()

    def clear(self) -> None:
        self._flights.clear()
