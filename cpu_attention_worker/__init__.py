"""cpu_attention_worker: the CPU KV cache and the C++ paged decode-attention kernel; needs no torch."""
