"""The span-cost measurement of bench-tracing runs and counts what the spans add: OTLP bytes are encoded for every
iteration, and the traced loop costs more CPU than the bare one."""

from apex_tools.bench import span_cost


def test_span_cost_encodes_every_iterations_spans_and_reports_the_cpu_they_add() -> None:
    result = span_cost.measure(iterations=64, rows=4, layers=2, every=16)
    assert result["otlp_bytes_per_iteration"] > 100  # a span with 4 links, more on the 4 sampled iterations
    assert result["traced_us_per_iteration"] > result["bare_us_per_iteration"] > 0
