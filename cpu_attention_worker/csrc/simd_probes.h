// Benchmark probes compiled with each instruction set's flags: the paged layout's read ceiling
// (the kernel's reads without its arithmetic), a streaming read and an FMA loop.
#pragma once

#include "simd_common.h"

namespace apex_serve::cpu_attention::simd {
namespace {

// Adds the bytes [begin, begin + bytes) read as floats to four chains (whole vectors; the tail
// as scalars): one chain would halve the read rate.
template <class Vec>
APEX_INLINE void read_span(const char* begin, size_t bytes, typename Vec::V (&chains)[4]) {
    constexpr size_t kVector = sizeof(float) * Vec::W;
    size_t offset = 0;
    for (int i = 0; offset + kVector <= bytes; offset += kVector, i = (i + 1) & 3) {
        chains[i] = Vec::add(chains[i], Vec::load(reinterpret_cast<const float*>(begin + offset)));
    }
    float rest = 0.0f;
    for (; offset + sizeof(float) <= bytes; offset += sizeof(float)) {
        rest += *reinterpret_cast<const float*>(begin + offset);
    }
    chains[0] = Vec::add(chains[0], Vec::set1(rest));
}

// The reads of attend_segment without its arithmetic: the same K and V lines in the same order
// with the same prefetching, summed as floats. The memory ceiling of the paged layout.
template <class Vec, class Storage>
void read_segment(const AttentionArgs& args, const Segment& segment, Workspace workspace) {
    using Raw = typename Storage::Raw;
    using V = typename Vec::V;
    const PagedShape& s = args.shape;
    const int64_t kv_heads = s.num_kv_heads, dim = s.head_dim;
    const size_t chunk = s.chunk();
    const auto* k_cache = static_cast<const Raw*>(args.k_cache);
    const auto* v_cache = static_cast<const Raw*>(args.v_cache);
    const int32_t* table = args.block_tables + segment.row * s.max_blocks_per_row;
    const int64_t first_block = segment.begin / s.block_size;
    const int64_t num_chunks = (segment.end - segment.begin + s.block_size - 1) / s.block_size * kv_heads;
    const auto chunk_offset = [&](int64_t c) {
        return (static_cast<size_t>(table[first_block + c / kv_heads]) * kv_heads + c % kv_heads) * chunk;
    };
    V chains[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
    const auto read_chunk = [&](const Raw* cache, int64_t c, int64_t n) {
        const Raw* lines = cache + chunk_offset(c);
        const int64_t target = c + args.prefetch_distance;
        const Raw* ahead = args.prefetch_distance > 0 && target < num_chunks ? cache + chunk_offset(target) : nullptr;
        for (int64_t t = 0; t < n; ++t) {
            if (ahead != nullptr) prefetch_line<Storage>(ahead + t * dim, dim);
            read_span<Vec>(reinterpret_cast<const char*>(lines + t * dim), dim * sizeof(Raw), chains);
        }
    };
    for (int64_t c0 = 0; c0 < num_chunks; c0 += kv_heads) {
        const int64_t n = min_of<int64_t>(s.block_size, segment.end - (first_block + c0 / kv_heads) * s.block_size);
        for (int64_t h = 0; h < kv_heads; ++h) read_chunk(k_cache, c0 + h, n);
        for (int64_t h = 0; h < kv_heads; ++h) read_chunk(v_cache, c0 + h, n);
    }
    workspace.data[0] = Vec::hsum(Vec::add(Vec::add(chains[0], chains[1]), Vec::add(chains[2], chains[3])));
}

// Sum of count floats with eight independent chains (one chain would halve the read rate).
template <class Vec>
float read_sum(const float* data, size_t count) {
    using V = typename Vec::V;
    constexpr size_t W = Vec::W;
    V sums[8];
    for (auto& x : sums) x = Vec::zero();
    size_t i = 0;
    for (; i + 8 * W <= count; i += 8 * W) {
        for (size_t j = 0; j < 8; ++j) sums[j] = Vec::add(sums[j], Vec::load(data + i + j * W));
    }
    float total = 0.0f;
    for (; i < count; ++i) total += data[i];
    for (const auto& x : sums) total += Vec::hsum(x);
    return total;
}

// kFmaChains independent FMA chains, `iterations` steps each; the result depends on every step.
constexpr int kFmaChains = 12;

template <class Vec>
double fma_loop(int64_t iterations) {
    using V = typename Vec::V;
    V chains[kFmaChains];
    for (int j = 0; j < kFmaChains; ++j) chains[j] = Vec::set1(1.0f + 0.001f * j);
    const V factor = Vec::set1(0.999999f), term = Vec::set1(1e-6f);
    for (int64_t i = 0; i < iterations; ++i) {
        for (auto& x : chains) x = Vec::fma(x, factor, term);
    }
    double total = 0.0;
    for (const auto& x : chains) total += Vec::hsum(x);
    return total;
}

template <class Vec>
constexpr int64_t fma_flops_per_iteration() {
    return 2 * kFmaChains * Vec::W;
}

}  // namespace
}  // namespace apex_serve::cpu_attention::simd
