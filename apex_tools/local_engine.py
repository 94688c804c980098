"""The scheduler core and the model runner in one process, with no gRPC between them.

Tests and benchmarks use it as the reference the service stack must match, token for token."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from apex_serve.types import FinishReason, SamplingParams, TokenLogprob
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from scheduler_service.config import SchedulerConfig
from scheduler_service.scheduler import Scheduler


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # when asked for: one per prompt token after the first


class LocalEngine:
    def __init__(self, worker: GpuWorkerConfig, scheduler: SchedulerConfig | None = None) -> None:
        self.runner = ModelRunner(worker)
        # no per-layer timeline by default: nothing here reads it
        self.scheduler = Scheduler(scheduler or SchedulerConfig(sample_layers_every=0), self.runner.info)
        self._ids = itertools.count()

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]:
        """Runs the prompts together (continuous batching) until all finish; results in order."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        ids = [f"local-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.scheduler.add_request(request_id, prompt, p)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        reasons: dict[str, FinishReason | None] = {}
        prompt_logprobs: dict[str, tuple[TokenLogprob, ...]] = {}
        while len(reasons) < len(ids):
            plan = self.scheduler.schedule()
            for out in self.scheduler.update_from_output(plan, self.runner.execute(plan)).outputs:
                tokens[out.request_id].extend(out.new_token_ids)
                if out.prompt_logprobs:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        return [Generation(tokens[i], reasons[i], prompt_logprobs.get(i, ())) for i in ids]
