"""The scheduler's state of one request."""

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from apex_serve.types import (
    CachedRequestData,
    FinishReason,
    NewRequestData,
    Placement,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Mutable per-request state; compared by identity, so a re-used id is a different request."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    peak_tokens: int  # tokens its KV may hold at most: prompt and max_tokens within the context, less the last output
    stop_token_ids: frozenset[int] = frozenset()  # tokens that end it (past min_tokens): stop ids, EOS unless ignored
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # in the pool of `placement`
    kv_slots: int = 0  # tokens its blocks hold, len(block_ids) x block size (kept by KVManager with block_ids)
    status: RequestStatus = RequestStatus.WAITING
    arrival: int = 0  # its place in the order of arrival (the scheduler's FCFS order)
    on_worker: bool = False  # a plan has sent it in full and no plan has freed it since
    placement: Placement = Placement.GPU
    last_step: int = 0  # on the CPU: the step it last decoded in, or joined the CPU queue in
    unchanged_entry: CachedRequestData | None = None  # its plan entry without new blocks, re-used step to step
    prefilling: bool = False  # admitted, and no plan has yet scheduled its prefill to the end of its tokens
    num_computed_tokens: int = 0  # while prefilling: the tokens of token_ids whose prefill plans have scheduled
    # asked for, until its first output carries them: those of the prompt tokens its computed chunks predicted
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_pending: int = 0  # tokens plans in flight will sample for it, not yet in output_token_ids
    num_tokens: int = field(init=False)  # prompt and output tokens, the pending ones counted
    num_prompt_tokens: int = field(init=False)
    asks_logprobs: bool = field(init=False)  # for its tokens' or its prompt's

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.asks_logprobs = self.sampling.logprobs is not None or self.sampling.prompt_logprobs is not None
        self.num_tokens = self.num_prompt_tokens + len(self.output_token_ids)

    def expect_token(self) -> None:
        """A plan that samples it went in flight: its next token counts before it is known."""
        self.num_tokens += 1
        self.num_pending += 1

    def take_token(self, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Its next token (the oldest pending one if any), and what its caller is told of it: finished with STOP on a
        stop token or EOS only past min_tokens (the worker should not sample one before), with LENGTH once the tokens
        known pass its peak; the first output carries the prompt logprobs gathered over its prefill. One call per
        running request per iteration: the steps are inlined, and an output without logprobs is built with the fields
        before them only."""
        outputs = self.output_token_ids
        outputs.append(token)
        num_output = len(outputs)
        if self.num_pending:
            self.num_pending -= 1
            known = self.num_tokens - self.num_pending
        else:
            known = self.num_tokens = self.num_tokens + 1
        reason = self._stop_reason(token, num_output) if token in self.stop_token_ids else None
        if reason is None and known > self.peak_tokens:
            reason = FinishReason.LENGTH
        # positional, in RequestOutput's field order: keywords cost a third more
        if logprob is None and not self.prompt_logprobs:
            return RequestOutput(self.request_id, (token,), reason is not None, reason, self.num_prompt_tokens,
                                 num_output)
        prompt_logprobs: tuple[TokenLogprob, ...] = ()
        if self.prompt_logprobs and num_output == 1:
            prompt_logprobs, self.prompt_logprobs = tuple(self.prompt_logprobs), []
        return RequestOutput(self.request_id, (token,), reason is not None, reason, self.num_prompt_tokens, num_output,
                             () if logprob is None else (logprob,), prompt_logprobs)

    def _stop_reason(self, token: int, num_output: int) -> FinishReason | None:
        """STOP for a stop token past min_tokens; None (with a warning) for one the worker sampled before."""
        if num_output > self.sampling.min_tokens:
            return FinishReason.STOP
        logger.warning("%s: stop token %d as output token %d of min_tokens %d does not finish it", self.request_id,
                       token, num_output, self.sampling.min_tokens)
        return None

    def forget_token(self) -> None:
        """Its oldest pending token will not come (the step that was to sample it failed)."""
        self.num_tokens -= 1
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forget the tokens of plans in flight (it is requeued: they will never be taken)."""
        self.num_tokens -= self.num_pending
        self.num_pending = 0

    @property
    def done_when_known(self) -> bool:
        """Its pending token reaches its peak: that token's output finishes it, so no plan schedules it again."""
        return self.num_tokens > self.peak_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def kv_len(self) -> int:
        """Tokens in its KV cache while running: all but the last sampled one."""
        return self.num_tokens - 1

    @property
    def lifetime_context(self) -> int:
        """Its decode context halfway between now and its peak: the mean over the rest of its life."""
        return (self.num_tokens + self.peak_tokens) // 2 + 1

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.prompt_token_ids + tuple(self.output_token_ids)

    def new_data(self, num_scheduled_tokens: int = 0) -> NewRequestData:
        """Its entry in full, in the plan that sends it to the worker, prefilling its first num_scheduled_tokens
        tokens (0: all of them)."""
        return NewRequestData(
            request_id=self.request_id,
            token_ids=self.token_ids,
            sampling=self.sampling,
            block_ids=tuple(self.block_ids),
            num_output_tokens=self.num_output_tokens,
            placement=self.placement,
            num_scheduled_tokens=num_scheduled_tokens,
        )

    def entry(self, new_block_ids: Sequence[int], sub_batch: int) -> CachedRequestData:
        """Its decode entry in a plan: a new object only when something changed (the plan carries deltas)."""
        if new_block_ids:
            return CachedRequestData(self.request_id, tuple(new_block_ids), sub_batch)
        entry = self.unchanged_entry
        if entry is None or entry.sub_batch != sub_batch:
            entry = self.unchanged_entry = CachedRequestData(self.request_id, (), sub_batch)
        return entry
