"""The scheduler's performance model (DESIGN §5): predicted time of one iteration from per-layer subtask costs, one
composition rule per execution mode, and online correction from the timings each Step returns.

Per layer, for each sub-batch sb (L layers; every cost in ns per layer). t_lin(n) is the profiled time of one call
of a whole layer's linear work (norm, QKV, RoPE, O-proj, MLP) over n rows: every GEMM call is a pass over its
weights, so a call over a part of the layer's weights costs that part's share of t_lin of the call's rows, with
qkv = QKV params / layer params the share of norm/QKV/RoPE and 1 - qkv that of O-proj and MLP. P = prefill tokens,
G = accelerator decode rows, C = CPU decode rows, R = requests (the rows the last layer keeps).
    att  = sum of t_pref(chunk, context) over its prefill requests + t_gatt(G, gpu_kv) if G
    load = t_xfer(prefill_loaded_tokens * kv_bytes_per_token)   (earlier chunks' KV of CPU-placed prefills, brought
           from the CPU pool to the accelerator before the chunk's attention; staging)
    catt = t_catt(C, cpu_kv), xfer = load + t_xfer(C * bytes_per_cpu_row), sync = t_sync(0); catt, sync 0 without C
    lin, by the layout the shape names (OverlapLayout; without CPU rows both are FUSED):
        FUSED  lin = t_lin(P + G + C)                           one call over all rows
               window = att + load                              (the accelerator work that needs no CPU row)
        SPLIT  lin = qkv * (t_lin(C) + t_lin(P + G)) + (1 - qkv) * (t_lin(P) + t_lin(G + C))     (no call for 0 rows)
               window = att + load + qkv * t_lin(P + G) + (1 - qkv) * t_lin(P)
                                                                (the others' QKV and the prefill rows' O-proj and MLP
                                                                run before the lazy wait; see gpu_worker.forward)
    dev  = lin + att + xfer                                     (the accelerator's work)
    the last layer's O-proj and MLP run over the kept rows only (one per request) where there are prefill rows:
        FUSED saves (1 - qkv) * (t_lin(P + G + C) - t_lin(R)), SPLIT (1 - qkv) * (t_lin(P) - t_lin(prefill requests))
GPU_ONLY:       layer = lin + att
ASYNC_OVERLAP:  layer = dev + max(0, catt + sync - window)      (the exposed lazy wait)
ASYM_PIPELINE:  two sub-batches A and B, each priced by the layout, each with its own linear calls (the weights
                streamed at least twice): layer = dev(A) + dev(B) + max(0, catt(B) + sync - dev(A))
                + max(0, catt(A) + sync - dev(B)); with one sub-batch, the ASYNC_OVERLAP rule.
total = L * layer - last-layer savings + t_step(requests)   (t_step: what the worker's step spends outside its
                                                             layers' timed subtasks: plan checks and state, embedding,
                                                             final norm, lm head, sampling, the output, and the code
                                                             between the subtasks of each layer; per iteration)
sub_batch_costs() gives one sub-batch's terms (the window among them) for a policy sizing its CPU rows.

Online correction: per measured subtask, measured ~ a + b * as-profiled is fitted online (least squares whose weights
are a running mean over the first 1/alpha steps and decay by 1 - alpha after), and its value at this iteration's
as-profiled cost becomes the subtask's factor before composing (so the overlap rules see corrected costs); then a
residual fit per mode and layout corrects the total the same way (per layout because the two differ in their
window rule and in their count of linear calls, so what those rules miss differs too). An affine fit, not a ratio,
because the tables miss fixed per-step costs (Python, launches) as well as proportional ones: a ratio fitted over
short decode steps and long prefill steps at once is wrong for both. A layout not observed yet borrows the same
mode's other layout's residual, a mode not observed yet the most observed one's.
Until the as-profiled costs vary enough to fit a slope, the fit is the plain ratio of the weighted means.
Which StepTimings field feeds which factor:
    linear           device_linear_ns x the layers' share of the linear weights (the rest is the final norm and lm
                     head, timed in the same bucket but predicted by t_step)
    device_attention device_attention_ns (prefill self-attention and GPU decode attention, with their KV writes)
    cpu_attention    cpu_attention_ns (the CPU worker busy: append and attention)
    staging          staging_ns
    residual         total_ns against the total composed with this step's own measured ratios, per (mode, layout): what
                     the subtasks cannot explain (step overhead, sync, the overlap rules), apart from the factors' lag
sync, step overhead and the exposed wait have no factor of their own: they are derived or not timed apart.
"""

from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol

from apex_serve.engine_stats import ErrorStats
from apex_serve.types import ExecutionMode, OverlapLayout, StepTimings
from scheduler_service.cost.online_fit import AffineFit, ErrorTracker
from scheduler_service.cost.shape import IterationShape, ModelShape, SubBatchShape
from scheduler_service.cost.tables import PerformanceTables


class Prediction(NamedTuple):
    """Predicted ns of one whole iteration (summed over layers) by subtask.

    total_ns = linear + device_attention + staging + exposed_wait + step_overhead + residual; cpu_attention and sync
    run beside the accelerator and count only through exposed_wait; residual is the correction's share (per mode and
    layout). Immutable, and a named tuple rather than a frozen dataclass: a decision composes every option it weighs,
    and a named tuple builds in half the time."""

    linear_ns: float
    device_attention_ns: float
    cpu_attention_ns: float
    staging_ns: float
    sync_ns: float
    exposed_wait_ns: float
    step_overhead_ns: float
    residual_ns: float
    total_ns: float

    def with_residual(self, factor: float) -> "Prediction":
        """The total scaled by factor, the difference booked as residual."""
        composed = self.total_ns - self.residual_ns
        return Prediction(self.linear_ns, self.device_attention_ns, self.cpu_attention_ns, self.staging_ns,
                          self.sync_ns, self.exposed_wait_ns, self.step_overhead_ns, (factor - 1.0) * composed,
                          factor * composed)


class CostModel(Protocol):
    """What the scheduler asks of a performance model: predict an iteration, learn from what it measured."""

    def predict(self, shape: IterationShape) -> Prediction: ...

    def observe(self, shape: IterationShape, predicted: Prediction, timings: StepTimings) -> None: ...

    def error_stats(self) -> dict[ExecutionMode, ErrorStats]: ...


class LayerCosts(Protocol):
    """Per-layer subtask costs in ns (t_step: per iteration), as the profiler's tables define them."""

    def t_lin(self, tokens: float) -> float: ...

    def t_pref(self, tokens: float, context: float) -> float:
        """Attention of a prefill chunk of `tokens` over the `context` tokens before it and itself, with its KV
        write (context 0: a whole prompt's causal self-attention)."""
        ...

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
MAX_PRICES = 1024  # sub-batch prices a ComposedCostModel memoises (one decision prices a few dozen at most)
_SUBTASKS = tuple(f.name for f in fields(SubtaskFactors))


class SubBatchCosts(NamedTuple):
    """One layer of one sub-batch under a layout, in ns (the composition rules of this module's docstring).

    device = linear + attention + staging is the accelerator's work; window is the part of it that does not wait for
    the sub-batch's CPU rows; hidden = cpu_attention + sync must hide behind it (or behind the other sub-batch's
    device work in ASYM_PIPELINE); last_layer_saving is what the last layer's kept-rows O-proj and MLP save.
    Immutable, and a named tuple rather than a frozen dataclass: a decision builds several, at a third of the cost."""

    linear: float
    attention: float
    staging: float
    cpu_attention: float
    sync: float
    window: float
    last_layer_saving: float

    @property
    def device(self) -> float:
        return self.linear + self.attention + self.staging

    @property
    def hidden(self) -> float:
        return self.cpu_attention + self.sync

    @property
    def exposed_wait(self) -> float:
        """The lazy wait of ASYNC_OVERLAP: the CPU attention and doorbell beyond the window."""
        return max(0.0, self.hidden - self.window)


def _call(costs: LayerCosts, factor: float, rows: float) -> float:
    """Linear time of one GEMM call over `rows` rows, a whole pass over the weights (no call for 0 rows)."""
    return factor * costs.t_lin(rows) if rows > 0 else 0.0


def sub_batch_costs(costs: LayerCosts, model: ModelShape, sb: SubBatchShape, layout: OverlapLayout,
                    factors: SubtaskFactors = _AS_PROFILED) -> SubBatchCosts:
    """One layer of sub-batch sb executed in `layout` (ignored without CPU rows: one call over all rows), its
    subtasks scaled by factors: the per-sub-batch rule of this module's docstring."""
    gpu_rows, cpu_rows = sb.gpu_rows, sb.cpu_rows
    prefill = sb.num_prefill_tokens
    attention = factors.device_attention * sum(costs.t_pref(n, p) for n, p in sb.prefills) if prefill else 0.0
    if gpu_rows:
        attention += factors.device_attention * costs.t_gatt(gpu_rows, sb.gpu_kv_tokens)
    staging = 0.0
    if sb.prefill_loaded_tokens:  # the prefill context's load comes before the chunk's attention: in the window
        staging = factors.staging * costs.t_xfer(sb.prefill_loaded_tokens * model.kv_bytes_per_token)
    window = attention + staging
    qkv, kept_prefill, linear_factor = model.qkv_fraction, len(sb.prefill_lens), factors.linear
    cpu_attention = sync = 0.0
    if cpu_rows:
        cpu_attention = factors.cpu_attention * costs.t_catt(cpu_rows, sb.cpu_kv_tokens)
        staging += factors.staging * costs.t_xfer(cpu_rows * model.bytes_per_cpu_row)
        sync = costs.t_sync(0)
    decode = gpu_rows + cpu_rows
    if cpu_rows and layout is OverlapLayout.SPLIT:
        others_qkv = qkv * _call(costs, linear_factor, prefill + gpu_rows)
        prefill_post = (1.0 - qkv) * _call(costs, linear_factor, prefill)
        linear = qkv * _call(costs, linear_factor, cpu_rows) + others_qkv + prefill_post
        linear += (1.0 - qkv) * _call(costs, linear_factor, decode)
        window += others_qkv + prefill_post
        saving = prefill_post - (1.0 - qkv) * _call(costs, linear_factor, kept_prefill)
    else:
        linear = _call(costs, linear_factor, prefill + decode)
        saving = (1.0 - qkv) * (linear - _call(costs, linear_factor, kept_prefill + decode)) if prefill else 0.0
    return SubBatchCosts(linear, attention, staging, cpu_attention, sync, window, max(0.0, saving))


def compose(costs: LayerCosts, model: ModelShape, shape: IterationShape,
            factors: SubtaskFactors = _AS_PROFILED) -> Prediction:
    """The iteration's predicted time by the composition rules of this module's docstring, the subtasks scaled by
    factors (no residual: Prediction.with_residual adds it)."""
    return _combine(costs, model, shape, [sub_batch_costs(costs, model, sb, shape.layout, factors)
                                          for sb in shape.sub_batches])


def _combine(costs: LayerCosts, model: ModelShape, shape: IterationShape, parts: list[SubBatchCosts]) -> Prediction:
    """The iteration's prediction from its sub-batches' per-layer costs (parts, in the order of shape.sub_batches)."""
    layers = model.num_layers
    if len(parts) == 2:  # ASYM_PIPELINE: each sub-batch's CPU attention hides behind the other's device work
        a, b = parts
        exposed = max(0.0, b.hidden - a.device) + max(0.0, a.hidden - b.device)
        linear = (layers * a.linear - a.last_layer_saving) + (layers * b.linear - b.last_layer_saving)
        attention, staging = layers * (a.attention + b.attention), layers * (a.staging + b.staging)
        cpu_attention, sync = layers * (a.cpu_attention + b.cpu_attention), layers * (a.sync + b.sync)
    else:
        (a,) = parts
        exposed = a.exposed_wait
        linear = layers * a.linear - a.last_layer_saving
        attention, staging = layers * a.attention, layers * a.staging
        cpu_attention, sync = layers * a.cpu_attention, layers * a.sync
    exposed_wait, step = layers * exposed, costs.t_step(shape.num_requests)
    # positional, in the field order (linear, device attention, CPU attention, staging, sync, exposed wait, step
    # overhead, residual, total): a decision composes each option it weighs
    return Prediction(linear, attention, cpu_attention, staging, sync, exposed_wait, step, 0.0,
                      linear + attention + staging + exposed_wait + step)


def pipelining_beats_gpu_only(t_lin: float, t_gatt: float, n_g: float, n_c: float) -> bool:
    """APEX eq. 6: asymmetric pipelining outruns GPU-only iff N_G / N_C < 2 T_lin / T_gatt + 3 + T_gatt / T_lin,
    with N_G, N_C the GPU's and the CPU's attention throughput and T_lin, T_gatt per-layer times of the batch."""
    if min(t_lin, t_gatt, n_g, n_c) <= 0:
        raise ValueError(f"t_lin, t_gatt, n_g, n_c: must all be > 0, got {t_lin}, {t_gatt}, {n_g}, {n_c}")
    return n_g / n_c < 2.0 * t_lin / t_gatt + 3.0 + t_gatt / t_lin


class ComposedCostModel:
    """A CostModel from per-layer costs: compose() plus the online correction. TableCostModel, ConstantCostModel and
    analytic_model.AnalyticCostModel differ only in where their LayerCosts come from."""

    def __init__(self, costs: LayerCosts, model: ModelShape, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
        self.costs = costs
        self.model = model
        self.alpha = alpha
        self._subtasks = {name: AffineFit(alpha) for name in _SUBTASKS}
        self._residual: dict[tuple[ExecutionMode, OverlapLayout], AffineFit] = {}
        self._errors: dict[ExecutionMode, ErrorTracker] = {}
        self.num_observed = 0  # steps whose timings refined the fits: a decision made on fewer is stale
        self._factors: SubtaskFactors | None = None
        self._resolved: dict[tuple[ExecutionMode, OverlapLayout], AffineFit | None] = {}  # by _residual_fit
        self._latest_raw: tuple[IterationShape, Prediction] | None = None
        # at the fitted factors, by sub-batch, or by (sub-batch, layout) for one with CPU rows
        self._prices: dict[SubBatchShape | tuple[SubBatchShape, OverlapLayout], SubBatchCosts] = {}

    @property
    def factors(self) -> SubtaskFactors:
        """Each subtask's measured / profiled ratio (of the weighted means); kept until the next observe()."""
        if self._factors is None:
            fits = self._subtasks
            self._factors = SubtaskFactors(linear=fits["linear"].value, device_attention=fits["device_attention"].value,
                                           cpu_attention=fits["cpu_attention"].value, staging=fits["staging"].value)
        return self._factors

    def residual_factor(self, mode: ExecutionMode, layout: OverlapLayout = OverlapLayout.FUSED) -> float:
        residual = self._residual_fit(mode, layout)
        return 1.0 if residual is None else residual.value

    def _residual_fit(self, mode: ExecutionMode, layout: OverlapLayout) -> AffineFit | None:
        """The residual fit of (mode, layout); one not run yet borrows the same mode's other layout, then the most
        observed fit: the tables' error common to every mode (step overhead, a slower machine) should not make an
        untried mode or layout look better or worse. Which fit that is holds until the next observe()."""
        key = (mode, layout)
        resolved = self._resolved
        if key in resolved:
            return resolved[key]
        fit = self._residual.get(key)
        if fit is None:
            same_mode = [f for (m, _), f in self._residual.items() if m is mode]
            fit = max(same_mode or self._residual.values(), key=lambda f: f.count, default=None)
        resolved[key] = fit
        return fit

    def priced(self, sb: SubBatchShape, layout: OverlapLayout) -> SubBatchCosts:
        """sub_batch_costs() of sb in `layout` at the fitted factors, memoised: one decision prices the same sub-batch
        under several options (GPU_ONLY's accelerator part is ASYM_PIPELINE's sub-batch 0 and NEO's fill reads it, a
        window probe is the option it sizes). observe() clears the memo (it moves the fitted factors), and so does
        reaching MAX_PRICES entries."""
        key = (sb, layout) if sb.cpu_rows else sb  # the layout matters only with CPU rows
        costs = self._prices.get(key)
        if costs is None:
            if len(self._prices) >= MAX_PRICES:
                self._prices.clear()
            costs = self._prices[key] = sub_batch_costs(self.costs, self.model, sb, layout, self.factors)
        return costs

    def composed(self, shape: IterationShape) -> Prediction:
        """compose() at the fitted factors, its sub-batches priced through the memo (priced())."""
        return _combine(self.costs, self.model, shape, [self.priced(sb, shape.layout) for sb in shape.sub_batches])

    def predict_raw(self, shape: IterationShape) -> Prediction:
        """The prediction of the costs alone, without online correction; the latest is kept, for observe() asks
        again of the step predict() was asked of."""
        latest = self._latest_raw
        if latest is None or latest[0] is not shape:
            latest = self._latest_raw = (shape, compose(self.costs, self.model, shape))
        return latest[1]

    def predict(self, shape: IterationShape) -> Prediction:
        fits = self._subtasks
        if all(fit.flat for fit in fits.values()):  # their factor at any as-profiled cost is the fitted one
            composed = self.composed(shape)  # priced as the decision priced it
        else:
            raw = self.predict_raw(shape)
            factors = SubtaskFactors(linear=fits["linear"].factor_at(raw.linear_ns),
                                     device_attention=fits["device_attention"].factor_at(raw.device_attention_ns),
                                     cpu_attention=fits["cpu_attention"].factor_at(raw.cpu_attention_ns),
                                     staging=fits["staging"].factor_at(raw.staging_ns))
            composed = compose(self.costs, self.model, shape, factors)
        residual = self._residual_fit(shape.mode, shape.run_layout)
        return composed if residual is None else composed.with_residual(residual.factor_at(composed.total_ns))

    def observe(self, shape: IterationShape, predicted: Prediction, timings: StepTimings) -> None:
        """Refine the factors from one step's measured timings and record the error of `predicted` (what this model
        predicted for the step) and of the uncorrected prediction."""
        if timings.total_ns <= 0:
            return
        self.num_observed += 1
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
            key = (shape.mode, shape.run_layout)
            self._residual.setdefault(key, AffineFit(self.alpha)).update(explained, timings.total_ns)
        # the fits moved: what was derived from them is derived again on asking
        self._factors = None
        self._prices.clear()
        self._resolved.clear()
        tracker = self._errors.setdefault(shape.mode, ErrorTracker(self.alpha))
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
    pref_ns_per_context_token: float = 0.0  # per chunk token and context token before it
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

    def t_pref(self, tokens: float, context: float) -> float:
        return self.pref_ns_per_token * tokens + self.pref_ns_per_context_token * tokens * context

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
