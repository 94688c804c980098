"""Which sampled iterations the timeline draws, and what each panel's caption says: a typical and the worst hybrid
iteration (with CPU attention), and why the two overlap measures of a panel differ when they do."""

from collections.abc import Sequence
from dataclasses import dataclass

from apex_serve.overlap import gap_totals
from apex_tools.trace_report.iterations import Iteration

AGREEMENT_TOLERANCE = 0.05  # hidden ratios this close are the same measurement read twice


@dataclass(frozen=True)
class Panel:
    role: str  # why it is drawn: "typical", "worst", or "sampled" when no iteration had CPU attention
    why: str  # how it was chosen, for the panel's heading
    iteration: Iteration


@dataclass(frozen=True)
class Selection:
    panels: list[Panel]
    note: str | None  # what the reader should know about the choice (no hybrid iteration, only one)


def _ratio(it: Iteration) -> float:
    exact = it.subtask_overlap
    return exact.hidden_ratio if exact is not None else 0.0


def _idle(it: Iteration) -> int:
    exact = it.subtask_overlap
    return exact.device_idle_ns if exact is not None else 0


def _duration(it: Iteration) -> int:
    return it.end_unix_ns - it.start_unix_ns


def choose_panels(sampled: Sequence[Iteration]) -> Selection:
    """The hybrid iteration of median hidden ratio and the one of lowest (ties: most accelerator idle); without a
    hybrid iteration, the sampled iteration of median duration."""
    if not sampled:
        return Selection([], None)
    hybrid = [it for it in sampled if it.hybrid]
    if not hybrid:
        typical = sorted(sampled, key=_duration)[len(sampled) // 2]
        note = (f"None of the {len(sampled)} sampled iterations had CPU attention (no CPU rows): the one of median "
                "duration is drawn, and there is no overlap to see.")
        return Selection([Panel("sampled", "median duration, no CPU rows", typical)], note)
    ranked = sorted(hybrid, key=lambda it: (_ratio(it), -_idle(it), it.start_unix_ns))
    typical, worst = ranked[len(ranked) // 2], ranked[0]
    of = f"of {len(hybrid)} sampled hybrid iterations"
    panels = [Panel("typical", f"median hidden ratio {of}", typical)]
    if worst is typical:
        return Selection(panels, "Only one sampled iteration had CPU attention: it is both the typical and the worst.")
    return Selection(panels + [Panel("worst", f"lowest hidden ratio {of}", worst)], None)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def measures_note(it: Iteration) -> str:
    """Whether the step-timings measure and the subtask-interval measure of the iteration agree, and why not.
    The step timings count every nanosecond the accelerator waited as exposed CPU attention (capped at the CPU
    attention time); the intervals count only the CPU attention time during which the accelerator did no work."""
    exact, step = it.subtask_overlap, it.step_overlap
    if exact is None or not exact.cpu_attention_ns:
        return "No CPU attention ran: neither measure has a ratio."
    if not step.cpu_attention_ns:
        return (f"The step timings recorded no CPU attention (the CPU side's busy time did not advance during the "
                f"step), so they give no ratio; the intervals show {_ms(exact.cpu_attention_ns)} of it.")
    by_intervals, by_steps = exact.hidden_ratio, step.hidden_ratio
    if abs(by_intervals - by_steps) <= AGREEMENT_TOLERANCE:
        idle_window = not it.gpu_rows and not it.num_prefills
        empty = " No accelerator rows: the overlap window was empty." if idle_window else ""
        return (f"The two measures agree within {AGREEMENT_TOLERANCE:.2f} ({by_intervals:.2f} and "
                f"{by_steps:.2f}).{empty}")
    exposed, waited = exact.cpu_attention_ns - exact.hidden_ns, step.device_idle_ns
    if waited > exposed:
        return (f"Step timings {by_steps:.2f} < intervals {by_intervals:.2f}: the accelerator waited "
                f"{_ms(waited)}, but by the intervals CPU attention ran unhidden for only {_ms(exposed)}; for the "
                f"other {_ms(waited - exposed)} of the wait the CPU side had not yet started the layer or not yet "
                f"handed its result back (doorbell latency), and the step timings count all of the wait as exposed "
                f"CPU attention.")
    return (f"Step timings {by_steps:.2f} > intervals {by_intervals:.2f}: {_ms(exposed - waited)} of CPU attention "
            f"ran while the accelerator was idle without waiting for it (host work between subtasks), which the "
            f"step timings count as hidden.")


def gaps_note(it: Iteration) -> str:
    """The accelerator's idle time within the iteration span per cause, largest first."""
    totals = sorted(((ns, cause) for cause, ns in gap_totals(it.gaps).items() if ns), key=lambda t: -t[0])
    parts = [f"{cause.value} {_ms(ns)}" for ns, cause in totals]
    return "Accelerator idle: " + (" · ".join(parts) if parts else "none")

