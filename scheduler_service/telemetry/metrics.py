"""The engine's Prometheus metrics (prometheus-client), with vLLM's meanings and buckets under an `apex_` prefix,
plus ours: iterations per mode, overlap of CPU attention with accelerator work, idle time, cost-model error, losses of
the CPU pool. docs/observability.md maps each to its vLLM counterpart. The registry always exists: the Scheduler's
GetMetrics answers it (the gateway's /metrics carries it), and metrics_server.MetricsServer puts it on a port of its
own."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from apex_serve.overlap import Overlap
from apex_serve.types import ExecutionMode, FinishReason, Placement
from scheduler_service.scheduler import Scheduler

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and SLO queries carry over
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
RATIO_BUCKETS = tuple(i / 10 for i in range(1, 11))
ITERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
POOL_LABELS = {Placement.GPU: "accelerator", Placement.CPU: "cpu"}


class _SchedulerState(Collector):
    """Gauges read from the scheduler at scrape time: nothing to keep in step on the hot path."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._scheduler.stats()
        yield GaugeMetricFamily("apex_num_requests_running", "Requests running (decoding or prefilling)",
                                value=stats.num_running)
        yield GaugeMetricFamily("apex_num_requests_waiting", "Requests waiting to be admitted",
                                value=stats.num_waiting)
        usage = GaugeMetricFamily("apex_kv_cache_usage_perc", "KV cache usage per pool, 0 to 1", labels=["pool"])
        for placement, label in POOL_LABELS.items():
            total = stats.total_blocks[placement]
            if total:
                usage.add_metric([label], 1.0 - stats.free_blocks[placement] / total)
        yield usage
        mape = GaugeMetricFamily("apex_cost_model_mape",
                                 "Mean absolute relative error of the predicted iteration time (recent, corrected)",
                                 labels=["mode"])
        for mode, error in stats.cost_model_error.items():
            mape.add_metric([mode.value], error.recent_corrected_mape)
        yield mape
        yield GaugeMetricFamily("apex_cpu_pool_degraded",
                                "1 while the CPU pool is lost and every request runs on the accelerator",
                                value=float(stats.cpu_pool_degraded))
        yield CounterMetricFamily("apex_cpu_pool_losses", "Times the gpu_worker lost its CPU pool (its "
                                  "cpu_attention_worker died or missed a deadline)", value=stats.cpu_pool_losses)


class EngineMetrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(_SchedulerState(scheduler))
        self.ttft = Histogram("apex_time_to_first_token_seconds", "Time to first token (arrival to first token)",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("apex_inter_token_latency_seconds", "Time between a request's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("apex_e2e_request_latency_seconds", "Arrival to last token of finished requests",
                             buckets=REQUEST_BUCKETS, registry=registry)
        self.queue = Histogram("apex_request_queue_time_seconds", "Arrival to first scheduled (waiting time)",
                               buckets=REQUEST_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("apex_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generation_tokens = Counter("apex_generation_tokens", "Tokens generated", registry=registry)
        self.success = Counter("apex_request_success", "Finished requests by finish reason", ["finished_reason"],
                               registry=registry)
        self.preemptions = Counter("apex_num_preemptions", "Requests preempted (recomputed later)", registry=registry)
        self.iterations = Counter("apex_iterations", "Engine iterations by execution mode", ["mode"],
                                  registry=registry)
        self.iteration_time = Histogram("apex_iteration_duration_seconds", "Measured step time by execution mode",
                                        ["mode"], buckets=ITERATION_BUCKETS, registry=registry)
        self.overlap_ratio = Histogram(
            "apex_iteration_overlap_ratio", "Per iteration with CPU attention: the fraction hidden under accelerator "
            "work", buckets=RATIO_BUCKETS, registry=registry)
        self.cpu_attention = Counter("apex_cpu_attention_seconds", "CPU attention time", registry=registry)
        self.hidden = Counter("apex_cpu_attention_hidden_seconds", "CPU attention time hidden under accelerator work",
                              registry=registry)
        self.device_idle = Counter("apex_device_idle_seconds", "Accelerator side waiting for the CPU in iterations",
                                   registry=registry)
        self.cpu_idle = Counter("apex_cpu_idle_seconds", "CPU attention side idle in iterations with CPU rows",
                                registry=registry)
        for mode in ExecutionMode:  # every series from the start, so rate() sees the first iteration of each
            self.iterations.labels(mode.value)
        for reason in FinishReason:
            self.success.labels(reason.value)

    def iteration(self, mode: ExecutionMode, seconds: float, overlap: Overlap, preemptions: int) -> None:
        """One iteration that returned: its time, its preemptions and, where it ran CPU attention, its overlap."""
        self.iterations.labels(mode.value).inc()
        self.iteration_time.labels(mode.value).observe(seconds)
        if preemptions:
            self.preemptions.inc(preemptions)
        if overlap.cpu_attention_ns:
            self.overlap_ratio.observe(overlap.hidden_ratio)
            self.cpu_attention.inc(overlap.cpu_attention_ns / 1e9)
            self.hidden.inc(overlap.hidden_ns / 1e9)
            self.device_idle.inc(overlap.device_idle_ns / 1e9)
            self.cpu_idle.inc(overlap.cpu_idle_ns / 1e9)
