"""The scheduler's performance model (DESIGN §5): predicted time of one iteration from per-layer subtask costs, one
composition rule per execution mode, and online correction from the timings each Step returns.

Per layer, for each sub-batch sb (L layers; every cost in ns per layer):
    lin  = t_lin(tokens of sb)                    pref = sum of t_pref(len) over its prefill requests
    gatt = t_gatt(gpu_rows, gpu_kv) if gpu_rows    catt = t_catt(cpu_rows, cpu_kv) if cpu_rows
    xfer = t_xfer(cpu_rows * bytes_per_cpu_row)    sync = t_sync(0); both 0 without CPU rows
    dev  = lin + pref + gatt + xfer               (the accelerator's work)
GPU_ONLY:       layer = lin + pref + gatt
ASYNC_OVERLAP:  layer = dev + max(0, catt + sync - window), window = the accelerator's work that does not wait for the
                CPU rows: gatt + pref + lin * (qkv * non-CPU tokens + (1 - qkv) * prefill tokens) / tokens, where
                qkv = QKV params / layer params (QKV of the other rows, and O + MLP of the prefill rows, run before
                the lazy wait; see gpu_worker.forward).
ASYM_PIPELINE:  two sub-batches A and B, each with its own linear pass (weights streamed twice):
                layer = dev(A) + dev(B) + max(0, catt(B) + sync - dev(A)) + max(0, catt(A) + sync - dev(B));
                with one sub-batch, the ASYNC_OVERLAP rule.
total = L * layer + t_step(requests)   (t_step: embedding, final norm, lm head, sampling, prepare; per iteration)

Online correction: per measured subtask, measured ~ a + b * as-profiled is fitted online (least squares whose weights
are a running mean over the first 1/alpha steps and decay by 1 - alpha after), and its value at this iteration's
as-profiled cost becomes the subtask's factor before composing (so the overlap rules see corrected costs); then a
residual fit per mode corrects the total the same way. An affine fit, not a ratio, because the tables miss fixed
per-step costs (Python, launches) as well as proportional ones: a ratio fitted over short decode steps and long
prefill steps at once is wrong for both. Until the as-profiled costs vary enough to fit a slope, the fit is the
plain ratio of the weighted means.
Which StepTimings field feeds which factor:
    linear           device_linear_ns x the layers' share of the linear weights (the rest is the final norm and lm
                     head, timed in the same bucket but predicted by t_step)
    device_attention device_attention_ns (prefill self-attention and GPU decode attention, with their KV writes)
    cpu_attention    cpu_attention_ns (the CPU worker busy: append and attention)
    staging          staging_ns
    residual[mode]   total_ns / the total composed with this step's own measured ratios: what the subtasks cannot
                     explain (step overhead, sync, the overlap rules), apart from the subtask factors' lag
sync, step overhead and the exposed wait have no factor of their own: they are derived or not timed apart.
"""

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Protocol

from apex_serve.types import ExecutionMode, StepTimings
from scheduler_service.perf_tables import PerformanceTables

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of the model: parameter counts and the bytes a CPU row stages."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weight_bytes_per_param: int = 2
    kv_bytes_per_element: int = 2  # the CPU KV cache's storage dtype
    staged_qo_bytes_per_element: int = 4  # q and o cross to and from the CPU in fp32 (gpu_worker.cpu_bridge)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_q_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "weight_bytes_per_param", "kv_bytes_per_element", "staged_qo_bytes_per_element"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: must divide num_q_heads={self.num_q_heads}, got {self.num_kv_heads}")

    @cached_property
    def qkv_params(self) -> int:
        return self.hidden_size * (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim

    @cached_property
    def layer_params(self) -> int:
        """QKV, O, gate/up/down and the two norms of one decoder layer."""
        o_proj = self.num_q_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.qkv_params + o_proj + mlp + 2 * self.hidden_size

    @cached_property
    def head_params(self) -> int:
        """Final norm and lm head: the linear work outside the layers."""
        return self.vocab_size * self.hidden_size + self.hidden_size

    @cached_property
    def qkv_fraction(self) -> float:
        return self.qkv_params / self.layer_params

    @cached_property
    def layers_linear_share(self) -> float:
        """Fraction of the step's linear weights that are in the layers (the rest: final norm and lm head)."""
        layers = self.num_layers * self.layer_params
        return layers / (layers + self.head_params)

    @cached_property
    def bytes_per_cpu_row(self) -> int:
        """Bytes staged per CPU decode row per layer: q out and o back, k and v out (the t_xfer x axis)."""
        qo = 2 * self.staged_qo_bytes_per_element * self.num_q_heads * self.head_dim
        kv = 2 * self.kv_bytes_per_element * self.num_kv_heads * self.head_dim
        return qo + kv

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_bytes_per_element * self.num_kv_heads * self.head_dim


def model_shape_from_config(config: dict[str, Any], kv_bytes_per_element: int | None = None) -> ModelShape:
    """ModelShape of a Hugging Face LLaMA-family config.json; the KV element size defaults to the weights' dtype."""
    dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"torch_dtype: must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    heads = config["num_attention_heads"]
    return ModelShape(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_q_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        weight_bytes_per_param=_DTYPE_BYTES[dtype],
        kv_bytes_per_element=kv_bytes_per_element or _DTYPE_BYTES[dtype],
    )


@dataclass(frozen=True)
class SubBatchShape:
    """What one sub-batch runs: prefill requests (on the accelerator) and decode rows on each side."""

    prefill_lens: tuple[int, ...] = ()
    gpu_rows: int = 0
    gpu_kv_tokens: int = 0  # KV tokens summed over the GPU rows, the current token included
    cpu_rows: int = 0
    cpu_kv_tokens: int = 0  # KV tokens summed over the CPU rows, the current token included

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.prefill_lens):
            raise ValueError(f"prefill_lens: must all be >= 1, got {self.prefill_lens}")
        for side in ("gpu", "cpu"):
            rows, kv = getattr(self, f"{side}_rows"), getattr(self, f"{side}_kv_tokens")
            if rows < 0 or kv < rows or (rows == 0 and kv):
                raise ValueError(f"{side}_kv_tokens: need {side}_rows >= 0 and {side}_rows <= {side}_kv_tokens "
                                 f"(0 without rows), got {rows} rows and {kv} tokens")
        if not self.num_requests:
            raise ValueError("sub-batch: must hold at least one request")

    @property
    def num_requests(self) -> int:
        return len(self.prefill_lens) + self.gpu_rows + self.cpu_rows

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.gpu_rows + self.cpu_rows


@dataclass(frozen=True)
class IterationShape:
    mode: ExecutionMode
    sub_batches: tuple[SubBatchShape, ...]

    def __post_init__(self) -> None:
        most = 2 if self.mode is ExecutionMode.ASYM_PIPELINE else 1
        if not 1 <= len(self.sub_batches) <= most:
            raise ValueError(f"sub_batches: {self.mode.value} takes 1 to {most}, got {len(self.sub_batches)}")
        if self.mode is ExecutionMode.GPU_ONLY and self.num_cpu_rows:
            raise ValueError(f"sub_batches: gpu_only runs no CPU rows, got {self.num_cpu_rows}")

    @property
    def num_requests(self) -> int:
        return sum(sb.num_requests for sb in self.sub_batches)

    @property
    def num_tokens(self) -> int:
        return sum(sb.num_tokens for sb in self.sub_batches)

    @property
    def num_cpu_rows(self) -> int:
        return sum(sb.cpu_rows for sb in self.sub_batches)


@dataclass(frozen=True)
class Prediction:
    """Predicted ns of one whole iteration (summed over layers) by subtask.

    total_ns = linear + device_attention + staging + exposed_wait + step_overhead + residual; cpu_attention and sync
    run beside the accelerator and count only through exposed_wait; residual is the per-mode correction's share."""

    linear_ns: float
    device_attention_ns: float
    cpu_attention_ns: float
    staging_ns: float
    sync_ns: float
    exposed_wait_ns: float
    step_overhead_ns: float
    residual_ns: float
    total_ns: float


@dataclass(frozen=True)
class ErrorStats:
    """Prediction error of the total for one mode; errors are (predicted - measured) / measured."""

    count: int
    raw_mape: float  # mean |error| of the uncorrected (table or formula) prediction, over all observations
    corrected_mape: float  # mean |error| of the predictions handed out (with the online correction)
    recent_corrected_mape: float  # the same, weighted towards the latest observations (the model's alpha)
    last_raw_error: float
    last_corrected_error: float


class CostModel(Protocol):
    """What the scheduler asks of a performance model: predict an iteration, learn from what it measured."""

    def predict(self, shape: IterationShape) -> Prediction: ...

    def observe(self, shape: IterationShape, predicted: Prediction, timings: StepTimings) -> None: ...

    def error_stats(self) -> dict[ExecutionMode, ErrorStats]: ...


class LayerCosts(Protocol):
    """Per-layer subtask costs in ns (t_step: per iteration), as the profiler's tables define them."""

    def t_lin(self, tokens: float) -> float: ...

    def t_pref(self, prompt_tokens: float) -> float: ...

    def t_gatt(self, rows: float, kv_tokens: float) -> float: ...

    def t_catt(self, rows: float, kv_tokens: float) -> float: ...

    def t_xfer(self, nbytes: float) -> float: ...

    def t_sync(self, x: float) -> float: ...

    def t_step(self, requests: float) -> float: ...


@dataclass(frozen=True)
class SubtaskFactors:
    """Multipliers on the per-layer costs (1.0: as profiled)."""

    linear: float = 1.0
    device_attention: float = 1.0
    cpu_attention: float = 1.0
    staging: float = 1.0


_AS_PROFILED = SubtaskFactors()
_SUBTASKS = tuple(f.name for f in fields(SubtaskFactors))


def compose(costs: LayerCosts, model: ModelShape, shape: IterationShape,
            factors: SubtaskFactors = _AS_PROFILED, residual_factor: float = 1.0) -> Prediction:
    """The iteration's predicted time by the composition rules of this module's docstring, the subtasks scaled by
    factors and the total by residual_factor."""
    lin_sum = att_sum = xfer_sum = catt_sum = sync_sum = last_layer_saving = 0.0
    device: list[float] = []  # per sub-batch: the accelerator's work of a layer
    hidden: list[float] = []  # per sub-batch: its CPU attention and doorbell, to hide behind other work
    windows: list[float] = []  # per sub-batch: its own work that does not wait for its CPU rows
    for sb in shape.sub_batches:
        tokens = sb.num_tokens
        lin = factors.linear * costs.t_lin(tokens)
        att = factors.device_attention * sum(costs.t_pref(n) for n in sb.prefill_lens)
        gatt = factors.device_attention * costs.t_gatt(sb.gpu_rows, sb.gpu_kv_tokens) if sb.gpu_rows else 0.0
        window = att + gatt
        att += gatt
        xfer = catt = sync = 0.0
        if sb.cpu_rows:
            catt = factors.cpu_attention * costs.t_catt(sb.cpu_rows, sb.cpu_kv_tokens)
            xfer = factors.staging * costs.t_xfer(sb.cpu_rows * model.bytes_per_cpu_row)
            sync = costs.t_sync(0)
            qkv = model.qkv_fraction
            window += lin * (qkv * (tokens - sb.cpu_rows) + (1.0 - qkv) * sb.num_prefill_tokens) / tokens
        lin_sum += lin
        if sb.num_prefill_tokens:  # the last layer's O-proj and MLP run for each request's last token only
            kept = factors.linear * costs.t_lin(sb.num_requests)
            last_layer_saving += (1.0 - model.qkv_fraction) * max(0.0, lin - kept)
        att_sum += att
        xfer_sum += xfer
        catt_sum += catt
        sync_sum += sync
        device.append(lin + att + xfer)
        hidden.append(catt + sync)
        windows.append(window)
    if len(device) == 2:  # ASYM_PIPELINE: each sub-batch's CPU attention hides behind the other's device work
        exposed = max(0.0, hidden[1] - device[0]) + max(0.0, hidden[0] - device[1])
    else:
        exposed = max(0.0, hidden[0] - windows[0])
    layers = model.num_layers
    linear, attention, staging = layers * lin_sum - last_layer_saving, layers * att_sum, layers * xfer_sum
    exposed_wait, step = layers * exposed, costs.t_step(shape.num_requests)
    composed = linear + attention + staging + exposed_wait + step
    residual = (residual_factor - 1.0) * composed
    return Prediction(
        linear_ns=linear,
        device_attention_ns=attention,
        cpu_attention_ns=layers * catt_sum,
        staging_ns=staging,
        sync_ns=layers * sync_sum,
        exposed_wait_ns=exposed_wait,
        step_overhead_ns=step,
        residual_ns=residual,
        total_ns=composed + residual,
    )


def pipelining_beats_gpu_only(t_lin: float, t_gatt: float, n_g: float, n_c: float) -> bool:
    """APEX eq. 6: asymmetric pipelining outruns GPU-only iff N_G / N_C < 2 T_lin / T_gatt + 3 + T_gatt / T_lin,
    with N_G, N_C the GPU's and the CPU's attention throughput and T_lin, T_gatt per-layer times of the batch."""
    if min(t_lin, t_gatt, n_g, n_c) <= 0:
        raise ValueError(f"t_lin, t_gatt, n_g, n_c: must all be > 0, got {t_lin}, {t_gatt}, {n_g}, {n_c}")
    return n_g / n_c < 2.0 * t_lin / t_gatt + 3.0 + t_gatt / t_lin


@dataclass
class _Ema:
    """A running mean over the first 1/alpha samples, an exponential moving average after: the first samples are
    not pulled towards the starting value."""

    alpha: float
    value: float = 1.0
    count: int = 0

    def update(self, sample: float) -> None:
        self.count += 1
        self.value += max(self.alpha, 1.0 / self.count) * (sample - self.value)


@dataclass
class _AffineFit:
    """measured ~ a + b * predicted by online weighted least squares (see the module docstring)."""

    alpha: float
    count: int = 0
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def update(self, predicted: float, measured: float) -> None:
        keep = 1.0 if self.count < 1.0 / self.alpha else 1.0 - self.alpha
        self.count += 1
        self.w = keep * self.w + 1.0
        self.sx = keep * self.sx + predicted
        self.sy = keep * self.sy + measured
        self.sxx = keep * self.sxx + predicted * predicted
        self.sxy = keep * self.sxy + predicted * measured

    @property
    def value(self) -> float:
        """The ratio of the weighted means: the factor where the predictions do not vary."""
        return self.sy / self.sx if self.sx > 0 else 1.0

    def factor_at(self, predicted: float) -> float:
        """The fitted measured / predicted at this prediction."""
        if self.sx <= 0 or predicted <= 0:
            return self.value
        mean_x, mean_y = self.sx / self.w, self.sy / self.w
        variance = self.sxx / self.w - mean_x * mean_x
        if self.count < 3 or variance <= (0.05 * mean_x) ** 2:
            return self.value
        slope = min(max((self.sxy / self.w - mean_x * mean_y) / variance, 0.1), 10.0)
        fitted = mean_y + slope * (predicted - mean_x)
        return max(fitted, 0.1 * predicted) / predicted


@dataclass
class _ErrorTracker:
    alpha: float
    count: int = 0
    raw_sum: float = 0.0
    corrected_sum: float = 0.0
    last_raw: float = 0.0
    last_corrected: float = 0.0

    def __post_init__(self) -> None:
        self.recent = _Ema(self.alpha)

    def add(self, raw_error: float, corrected_error: float) -> None:
        self.count += 1
        self.raw_sum += abs(raw_error)
        self.corrected_sum += abs(corrected_error)
        self.recent.update(abs(corrected_error))
        self.last_raw, self.last_corrected = raw_error, corrected_error

    def stats(self) -> ErrorStats:
        return ErrorStats(
            count=self.count,
            raw_mape=self.raw_sum / self.count,
            corrected_mape=self.corrected_sum / self.count,
            recent_corrected_mape=self.recent.value,
            last_raw_error=self.last_raw,
            last_corrected_error=self.last_corrected,
        )


class ComposedCostModel:
    """A CostModel from per-layer costs: compose() plus the online correction. TableCostModel, ConstantCostModel and
    analytic_model.AnalyticCostModel differ only in where their LayerCosts come from."""

    def __init__(self, costs: LayerCosts, model: ModelShape, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
        self.costs = costs
        self.model = model
        self.alpha = alpha
        self._subtasks = {name: _AffineFit(alpha) for name in _SUBTASKS}
        self._residual: dict[ExecutionMode, _AffineFit] = {}
        self._errors: dict[ExecutionMode, _ErrorTracker] = {}

    @property
    def factors(self) -> SubtaskFactors:
        """Each subtask's measured / profiled ratio (of the weighted means)."""
        return SubtaskFactors(**{name: fit.value for name, fit in self._subtasks.items()})

    def residual_factor(self, mode: ExecutionMode) -> float:
        residual = self._residual.get(mode)
        return 1.0 if residual is None else residual.value

    def predict_raw(self, shape: IterationShape) -> Prediction:
        """The prediction of the costs alone, without online correction."""
        return compose(self.costs, self.model, shape)

    def predict(self, shape: IterationShape) -> Prediction:
        raw = self.predict_raw(shape)
        as_profiled = {"linear": raw.linear_ns, "device_attention": raw.device_attention_ns,
                       "cpu_attention": raw.cpu_attention_ns, "staging": raw.staging_ns}
        factors = SubtaskFactors(**{name: self._subtasks[name].factor_at(as_profiled[name]) for name in _SUBTASKS})
        composed = compose(self.costs, self.model, shape, factors)
        residual = self._residual.get(shape.mode)
        return compose(self.costs, self.model, shape, factors,
                       1.0 if residual is None else residual.factor_at(composed.total_ns))

    def observe(self, shape: IterationShape, predicted: Prediction, timings: StepTimings) -> None:
        """Refine the factors from one step's measured timings and record the error of `predicted` (what this model
        predicted for the step) and of the uncorrected prediction."""
        if timings.total_ns <= 0:
            return
        raw = self.predict_raw(shape)
        pairs = {  # subtask: (measured, as profiled), ns over the step
            "linear": (timings.device_linear_ns * self.model.layers_linear_share, raw.linear_ns),
            "device_attention": (timings.device_attention_ns, raw.device_attention_ns),
            "cpu_attention": (timings.cpu_attention_ns, raw.cpu_attention_ns),
            "staging": (timings.staging_ns, raw.staging_ns),
        }
        ratios = {}  # this step's own factors: measured / as profiled where it ran the subtask, else the fitted one
        for name, (measured, profiled) in pairs.items():
            fit = self._subtasks[name]
            ratios[name] = measured / profiled if measured > 0 and profiled > 0 else fit.factor_at(profiled)
            if measured > 0 and profiled > 0:
                fit.update(profiled, measured)
        explained = compose(self.costs, self.model, shape, SubtaskFactors(**ratios)).total_ns
        if explained > 0:
            self._residual.setdefault(shape.mode, _AffineFit(self.alpha)).update(explained, timings.total_ns)
        tracker = self._errors.setdefault(shape.mode, _ErrorTracker(self.alpha))
        tracker.add(
            (raw.total_ns - timings.total_ns) / timings.total_ns,
            (predicted.total_ns - timings.total_ns) / timings.total_ns,
        )

    def error_stats(self) -> dict[ExecutionMode, ErrorStats]:
        return {mode: tracker.stats() for mode, tracker in self._errors.items()}


class TableCostModel(ComposedCostModel):
    """The cost model of the profiler's measured tables."""

    def __init__(self, tables: PerformanceTables, shape: ModelShape, alpha: float = 0.1) -> None:
        if tables.num_layers != shape.num_layers:
            raise ValueError(f"num_layers: the tables have {tables.num_layers}, the model {shape.num_layers}")
        super().__init__(tables, shape, alpha)


@dataclass(frozen=True)
class ConstantCosts:
    """Per-layer costs affine in their sizes (ns), for tests and back-of-envelope checks."""

    lin_ns: float = 0.0
    lin_ns_per_token: float = 0.0
    pref_ns_per_token: float = 0.0
    gatt_ns_per_row: float = 0.0
    gatt_ns_per_kv_token: float = 0.0
    catt_ns_per_row: float = 0.0
    catt_ns_per_kv_token: float = 0.0
    xfer_ns_per_byte: float = 0.0
    sync_ns: float = 0.0
    step_ns: float = 0.0
    step_ns_per_request: float = 0.0

    def t_lin(self, tokens: float) -> float:
        return self.lin_ns + self.lin_ns_per_token * tokens

    def t_pref(self, prompt_tokens: float) -> float:
        return self.pref_ns_per_token * prompt_tokens

    def t_gatt(self, rows: float, kv_tokens: float) -> float:
        return self.gatt_ns_per_row * rows + self.gatt_ns_per_kv_token * kv_tokens

    def t_catt(self, rows: float, kv_tokens: float) -> float:
        return self.catt_ns_per_row * rows + self.catt_ns_per_kv_token * kv_tokens

    def t_xfer(self, nbytes: float) -> float:
        return self.xfer_ns_per_byte * nbytes

    def t_sync(self, x: float) -> float:
        return self.sync_ns

    def t_step(self, requests: float) -> float:
        return self.step_ns + self.step_ns_per_request * requests


class ConstantCostModel(ComposedCostModel):
    """The cost model of ConstantCosts: the same composition and correction, with costs a test can add up by hand."""

    def __init__(self, costs: ConstantCosts, shape: ModelShape, alpha: float = 0.1) -> None:
        super().__init__(costs, shape, alpha)
