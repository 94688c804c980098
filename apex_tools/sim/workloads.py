"""Synthetic workloads of the simulator (DESIGN §7), each a pure function of its spec and seed.

Lengths are in tokens, arrivals in seconds from the first possible arrival (0):
    chat       ShareGPT-like: prompt lognormal (median 200, sigma 1.0, clipped to [4, 2048]), output lognormal
               (median 250, sigma 0.8, clipped to [4, 2048])
    short-chat chat's shape cut to what a T4's LLaMA-2-7B KV pool (1,088 tokens) holds: prompt and output clipped to
               [4, 512] each (a request peaks at 1,023 tokens)
    cot        chain of thought: prompt lognormal (median 100, sigma 0.5, clipped to [16, 512]), output uniform in
               [1024, 4096]
    short-cot  cot's shape cut to what a T4's LLaMA-2-7B KV pool (1,088 tokens) holds: prompt lognormal (median 100,
               sigma 0.5, clipped to [16, 256]), output uniform in [256, 768]; a request peaks at 1,023 tokens
    summarize  prompt uniform in [1024, 4000], output lognormal (median 100, sigma 0.3, clipped to [16, 256])
    osc        NEO's T4 summarization workload (NEO-MLSys25/NEO, evaluation/data/osc-Llama-2-7b-hf.json, the input
               of its Figure 6c script): its 2,000 requests' prompts have mean 372.5 and standard deviation 103.7 in
               [29, 589] tokens, their outputs mean 45.3 and standard deviation 8.9 in [15, 129]; drawn here as
               normals of those moments, rounded and clipped to those ranges (a request peaks at 717 tokens)
    grid       every request grid_prompt_len in, grid_output_len out
Arrivals: a Poisson process of `rate` requests per second (exponential gaps, the first after one gap), or all at
time 0 when rate is 0.
"""

from dataclasses import dataclass

import numpy as np

WORKLOADS = ("chat", "short-chat", "cot", "short-cot", "summarize", "osc", "grid")


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str
    num_requests: int = 1000
    rate: float = 0.0  # requests per second; 0: all arrive at once
    seed: int = 0
    grid_prompt_len: int = 512
    grid_output_len: int = 512

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"kind: must be one of {WORKLOADS}, got {self.kind!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1, got {self.num_requests}")
        if not self.rate >= 0.0:
            raise ValueError(f"rate: must be >= 0 (0: all at once), got {self.rate}")
        if self.grid_prompt_len < 1 or self.grid_output_len < 1:
            raise ValueError(f"grid lengths: must be >= 1, got {self.grid_prompt_len} in, {self.grid_output_len} out")


def _lognormal(rng: np.random.Generator, median: float, sigma: float, low: int, high: int, n: int) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), low, high).astype(np.int64)


def _normal(rng: np.random.Generator, mean: float, std: float, low: int, high: int, n: int) -> np.ndarray:
    return np.clip(np.rint(rng.normal(mean, std, n)), low, high).astype(np.int64)


def _lengths(spec: WorkloadSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths), each [num_requests]."""
    n = spec.num_requests
    if spec.kind == "chat":
        return _lognormal(rng, 200, 1.0, 4, 2048, n), _lognormal(rng, 250, 0.8, 4, 2048, n)
    if spec.kind == "short-chat":
        return _lognormal(rng, 200, 1.0, 4, 512, n), _lognormal(rng, 250, 0.8, 4, 512, n)
    if spec.kind == "cot":
        return _lognormal(rng, 100, 0.5, 16, 512, n), rng.integers(1024, 4096, n, endpoint=True)
    if spec.kind == "short-cot":
        return _lognormal(rng, 100, 0.5, 16, 256, n), rng.integers(256, 768, n, endpoint=True)
    if spec.kind == "summarize":
        return rng.integers(1024, 4000, n, endpoint=True), _lognormal(rng, 100, 0.3, 16, 256, n)
    if spec.kind == "osc":
        return _normal(rng, 372.5, 103.7, 29, 589, n), _normal(rng, 45.3, 8.9, 15, 129, n)
    return np.full(n, spec.grid_prompt_len), np.full(n, spec.grid_output_len)


def generate(spec: WorkloadSpec) -> list[SimRequest]:
    """The workload's requests in arrival order; the same spec gives the same list."""
    rng = np.random.default_rng(spec.seed)
    prompts, outputs = _lengths(spec, rng)
    if spec.rate > 0:
        arrivals = np.cumsum(rng.exponential(1.0 / spec.rate, spec.num_requests))
    else:
        arrivals = np.zeros(spec.num_requests)
    return [SimRequest(float(t), int(p), int(o)) for t, p, o in zip(arrivals, prompts, outputs)]


def peak_kv_tokens(request: SimRequest) -> int:
    """The KV a request peaks at: its prompt and every output token but the last."""
    return request.prompt_len + request.output_len - 1


def fit_to(requests: list[SimRequest], max_kv_tokens: int) -> list[SimRequest]:
    """The requests with their peak KV (peak_kv_tokens) cut to max_kv_tokens, the output first, then the prompt (to at
    most half): every policy, gpu-only included, can then serve every request, and the policies are compared on the
    same work."""
    fitted = []
    for r in requests:
        prompt, output = r.prompt_len, r.output_len
        if peak_kv_tokens(r) > max_kv_tokens:
            prompt = min(prompt, max(1, max_kv_tokens // 2))
            output = max(1, max_kv_tokens + 1 - prompt)
        fitted.append(SimRequest(r.arrival_s, prompt, output))
    return fitted
