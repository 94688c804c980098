// Runs the kernels: picks the instruction set at run time, splits the batch over the thread
// pool, merges split rows; plus the KV append and the benchmark's two anchors (read bandwidth
// and FMA throughput). Arguments are trusted: bindings.cpp validates them first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "paged_attention.h"

namespace apex_serve::cpu_attention {

bool isa_supported(Isa isa);  // the CPU (and OS) can run it
Isa best_isa();  // the default: the fastest measured that this CPU runs
const IsaKernels& isa_kernels(Isa isa);
// The kernels that run a head_dim on isa: the AVX-512 ones hand head dims that are not a
// multiple of 32 to AVX2.
const IsaKernels& kernels_for(Isa isa, int64_t head_dim);

// out [num_rows, num_q_heads, head_dim]. Concurrent calls run one after the other.
void paged_attention(const AttentionArgs& args, KvDtype dtype, Isa isa, int num_threads, float* out);
// The same work split, order and prefetching with the arithmetic left out: every K and V line
// the attention would read is read once (the memory ceiling of the paged layout).
void paged_read(const AttentionArgs& args, KvDtype dtype, Isa isa, int num_threads);

// Copies each row's new line [num_kv_heads, head_dim] into its slot (block = slot / block_size,
// offset = slot % block_size) of a cache; element_size bytes per element, any storage dtype.
void append_lines(std::byte* cache, const std::byte* lines, const int64_t* slot_mapping, const PagedShape& s,
                  size_t element_size);

// GB/s of each of `repeats` passes reading data[0, count) split over num_threads threads.
std::vector<double> read_bandwidth(const float* data, size_t count, int num_threads, int repeats, Isa isa);
// GFLOP/s of num_threads threads each running `iterations` steps of isa's FMA loop.
double fma_throughput(int num_threads, int64_t iterations, Isa isa);

}  // namespace apex_serve::cpu_attention
