"""Domain types shared by the services. Protobuf never appears here (see apex_serve.convert)."""

import enum
from dataclasses import dataclass, field

from apex_serve.errors import InvalidArgument
from apex_serve.hardware import HardwareFingerprint

MAX_LOGPROBS = 20


class _IdentityHashed(enum.Enum):
    """An enum hashed by identity, in C: its members are singletons compared by identity, while enum.Enum hashes a
    member by its name in Python, which the scheduler pays tens of times per iteration in its dict lookups."""

    __hash__ = object.__hash__


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


class ExecutionMode(_IdentityHashed):
    GPU_ONLY = "gpu_only"
    ASYM_PIPELINE = "asym_pipeline"
    ASYNC_OVERLAP = "async_overlap"


class OverlapLayout(_IdentityHashed):
    """How a layer with CPU decode rows runs its linear work (DESIGN §3); without CPU rows both are the same.

    FUSED: one norm/QKV/RoPE GEMM over all rows; the CPU rows' q/k/v slices are staged and the doorbell rung; the
    overlap window is the accelerator work that does not need the CPU rows (GPU rows' and prefill rows' attention);
    one O-proj and MLP over all rows after the lazy wait. One pass over the layer's weights.
    SPLIT: the CPU rows' QKV first, so the other rows' QKV (and the prefill rows' O-proj and MLP) join the window, at
    the price of a second pass over those weights.
    """

    FUSED = "fused"
    SPLIT = "split"


class SubtaskKind(enum.Enum):
    """A lane of the iteration timeline: what the accelerator side or the CPU did in one layer."""

    DEVICE_LINEAR = "device_linear"  # norms, projections, RoPE, MLP (layer = num_layers: the LM head)
    DEVICE_ATTENTION = "device_attention"  # attention of the accelerator's rows, prefill KV writes
    STAGING = "staging"  # the CPU rows' q/k/v to the staging buffers and o back
    CPU_ATTENTION = "cpu_attention"  # the cpu_attention_worker's KV append + paged decode attention

    @property
    def on_cpu(self) -> bool:
        return self is SubtaskKind.CPU_ATTENTION


class Placement(_IdentityHashed):
    """Where a request's KV cache lives, and so where its decode attention runs."""

    GPU = "gpu"  # the accelerator's pool (the CPU device when there is no GPU)
    CPU = "cpu"  # the cpu_attention_worker's shared-memory pool

    @property
    def other(self) -> "Placement":
        """The pool a swap moves a request to."""
        return Placement.CPU if self is Placement.GPU else Placement.GPU


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0 and min_p 0 disable top-k and min-p.

    bad_words are text; the gateway tokenizes them into bad_words_token_ids, which the worker applies.
    skip_special_tokens and truncate_prompt_tokens are applied by the gateway.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the request before this many tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: no logprobs; n: the sampled token's and the top n
    min_p: float = 0.0  # after temperature, drop tokens less likely than min_p times the likeliest
    allowed_token_ids: tuple[int, ...] = ()  # empty: every token; otherwise only these may be sampled
    bad_words: tuple[str, ...] = ()  # never generated (as tokenized with and without a leading space)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # the last id is banned after the others
    skip_special_tokens: bool = True  # special tokens are left out of the text
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    # None: no prompt logprobs; k: each prompt token's logprob (the first has none) and the top k at its position
    prompt_logprobs: int | None = None
    # "": unconstrained; else an llguidance grammar (the gateway builds it from response_format, structured_outputs,
    # guided_* or a forced tool call): the worker masks every token the grammar does not allow at each step
    structured_grammar: str = ""

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise InvalidArgument("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens <= 0:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument("seed", f"must be in [0, 2^63), got {self.seed}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgument("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidArgument(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidArgument("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument("min_p", f"must be in [0, 1], got {self.min_p}")
        if any(t < 0 for t in self.allowed_token_ids):
            raise InvalidArgument("allowed_token_ids", "token ids must be >= 0")
        if any(not word.strip() for word in self.bad_words):
            raise InvalidArgument("bad_words", "words must not be empty or blank")
        if any(not ids or min(ids) < 0 for ids in self.bad_words_token_ids):
            raise InvalidArgument("bad_words_token_ids", "each must be a non-empty sequence of token ids >= 0")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise InvalidArgument("truncate_prompt_tokens", f"must be >= 1, got {self.truncate_prompt_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class WorkerInfo:
    """What a gpu_worker tells the scheduler at start-up (measured, not configured)."""

    model_name: str
    num_layers: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_kv_blocks: int
    device: str
    dtype: str
    num_cpu_kv_blocks: int = 0  # 0: no cpu_attention_worker, every request stays on the accelerator
    hardware: HardwareFingerprint | None = None
    model_config_hash: str = ""  # sha256 of the model's config.json
    cpu_kv_dtype: str = ""  # empty without a cpu_attention_worker
    cpu_max_rows: int = 0  # CPU decode rows one sub-batch can stage
    bytes_per_cpu_row: int = 0  # staged per CPU row per layer: q and o (fp32), k and v (CPU KV dtype)
    model_config_json: str = ""  # the model's config.json (the scheduler's cost model reads its shapes)
    # the CPU pool attached now (False while lost and being re-attached); the cpu_* fields and num_cpu_kv_blocks
    # describe the latest data plane attached
    cpu_pool_attached: bool = False
    cpu_pool_generation: int = 0  # data planes attached since start: 1 after the first, +1 per re-attach
    decode_attention: str = ""  # the decode kernel that runs (gpu_worker.decode_kernels); "": not said, as "sdpa"

    @property
    def paged_decode(self) -> bool:
        """Whether the accelerator's decode attention reads each row's own context (FlashInfer's paged kernel)
        rather than padding the rows to the longest (SDPA's gathered batch)."""
        return self.decode_attention == "flashinfer"


@dataclass(frozen=True)
class NewRequestData:
    """A request the worker has not seen, or must recompute after preemption.

    Its first num_scheduled_tokens of token_ids (all when 0) are prefilled in this step (always on the
    accelerator); the rest follow in later steps as chunks (CachedRequestData.num_scheduled_tokens), and
    the request samples its first token in the step whose chunk reaches the end of token_ids. The last
    num_output_tokens of token_ids were produced by the model (non-zero only on resume), which keeps
    seeded sampling reproducible. block_ids are in the pool of `placement` and cover all of token_ids:
    a CPU request's prefill writes its KV layer by layer straight into the CPU pool.
    """

    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    block_ids: tuple[int, ...]
    num_output_tokens: int = 0
    placement: Placement = Placement.GPU
    sub_batch: int = 0  # ASYM_PIPELINE: 0 or 1; other modes: 0
    num_scheduled_tokens: int = 0  # tokens of token_ids prefilled in this step, from position 0; 0: all

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens this step prefills for it."""
        return self.num_scheduled_tokens or len(self.token_ids)


@dataclass(frozen=True)
class CachedRequestData:
    """A request already on the worker; new_block_ids are appended. It decodes one token, or, while its prefill is
    chunked (num_scheduled_tokens > 0), prefills the next num_scheduled_tokens of its tokens after those already
    computed, and samples only if that chunk reaches the end of its tokens."""

    request_id: str
    new_block_ids: tuple[int, ...] = ()  # in the pool the request lives in (after this step's swaps)
    sub_batch: int = 0  # ASYM_PIPELINE: 0 or 1; other modes: 0
    num_scheduled_tokens: int = 0  # a chunk of its prefill; 0: a decode row (one token)


@dataclass(frozen=True)
class SwapData:
    """Move a request's KV to the other pool before the step runs: block_ids are its blocks in the
    destination pool (at least as many as its cached tokens need); its source blocks are free after."""

    request_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """One engine iteration, as the scheduler sends it to the gpu_worker."""

    step_id: int
    new_requests: tuple[NewRequestData, ...] = ()
    cached_requests: tuple[CachedRequestData, ...] = ()
    freed_request_ids: tuple[str, ...] = ()  # dropped by the worker before the step runs
    mode: ExecutionMode = ExecutionMode.GPU_ONLY
    layout: OverlapLayout = OverlapLayout.FUSED  # of every sub-batch with CPU rows
    swap_out: tuple[SwapData, ...] = ()  # accelerator pool -> CPU pool, before the step
    swap_in: tuple[SwapData, ...] = ()  # CPU pool -> accelerator pool, before the step
    record_subtasks: bool = False  # a sampled iteration: the worker returns each layer's subtask intervals
    # seconds each layer of the CPU rows may take before the cpu_attention_worker counts as lost; 0: the worker's
    # configured timeout
    cpu_wait_timeout_s: float = 0.0
    # made while the plan sent before it ran, without that step's output: the worker refuses it if that step failed
    planned_ahead: bool = False

    @property
    def is_empty(self) -> bool:
        return not self.new_requests and not self.cached_requests

    @property
    def num_tokens(self) -> int:
        return sum(r.num_prefill_tokens for r in self.new_requests) + sum(
            r.num_scheduled_tokens or 1 for r in self.cached_requests)


@dataclass(frozen=True)
class StepTimings:
    """Wall time of a step's phases; the forward is broken down by subtask (summed over layers)."""

    prepare_ns: int = 0
    forward_ns: int = 0
    sample_ns: int = 0
    total_ns: int = 0
    swap_ns: int = 0  # KV block copies between the pools
    device_linear_ns: int = 0  # norms, projections, RoPE, MLP on the accelerator
    device_attention_ns: int = 0  # attention of the accelerator's rows (prefill and GPU decode), prefill KV writes
    staging_ns: int = 0  # CPU rows' q/k/v to the staging buffers, metadata, o back
    wait_ns: int = 0  # the accelerator blocked waiting for the CPU's attention
    cpu_attention_ns: int = 0  # the cpu_attention_worker's serving thread busy (append + attention)
    start_unix_ns: int = 0  # wall clock when the step began; it ended total_ns later


@dataclass(frozen=True)
class Subtask:
    """One layer's subtask on one side, in wall-clock nanoseconds (both workers read the same clock)."""

    kind: SubtaskKind
    layer: int
    sub_batch: int
    start_unix_ns: int
    end_unix_ns: int


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a generated token under the model's raw distribution, and the top ones."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class StepOutput:
    """The worker's answer to a StepPlan: one sampled token per scheduled request."""

    step_id: int
    sampled: dict[str, int] = field(default_factory=dict)
    timings: StepTimings = StepTimings()
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # requests that asked for them
    subtasks: tuple[Subtask, ...] = ()  # when the plan asked (record_subtasks), in start order
    # requests that asked for prompt logprobs and computed prompt positions in this step: the logprobs of the prompt
    # tokens those positions predict, in order (prompt token i from position i - 1; token 0 has none); a prefill in
    # chunks gets its prompt's logprobs over several steps, a recomputed request (num_output_tokens > 0) none
    prompt_logprobs: dict[str, tuple[TokenLogprob, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one request after an iteration, as the engine loop streams them. Not frozen: a frozen dataclass
    costs about 0.8 us to build, and the scheduler builds one per running request per iteration; nothing changes one
    once built."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token when the request asked for them
    # on the first output of a request that asked for them: one per prompt token after the first
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
