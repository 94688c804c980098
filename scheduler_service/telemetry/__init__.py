"""What the engine loop reports about itself, beside the loop and off its decisions: Prometheus metrics (metrics),
OpenTelemetry iteration spans (spans), and per-request latencies and the sampled timeline (observer)."""
