"""gpu_worker: weights, the accelerator KV cache, layer execution and sampling (CUDA when present, else the CPU)."""
