// Paged decode attention and KV append on raw pointers (no Python). Arguments are trusted:
// the bindings in paged_attention.cpp validate shapes, dtypes and indices first.
//
// One layer's cache, K and V each [num_blocks, num_kv_heads, block_size, head_dim], so one
// (block, kv_head) chunk is a contiguous block_size x head_dim run (DESIGN.md section 4).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "kv_dtype.h"

namespace apex_serve::cpu_attention {

struct PagedShape {
    int64_t num_rows;
    int64_t num_q_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t num_blocks;
    int64_t block_size;
    int64_t max_blocks_per_row;

    int64_t group() const { return num_q_heads / num_kv_heads; }
    size_t chunk() const { return static_cast<size_t>(block_size * head_dim); }
};

// Runs task(index, worker) for index in [0, num_tasks) on num_workers threads (the caller is
// worker 0); indices are handed out one at a time, so uneven tasks balance.
template <class Task>
void parallel_for(int64_t num_tasks, int num_workers, const Task& task) {
    std::atomic<int64_t> next{0};
    auto work = [&](int worker) {
        for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) task(i, worker);
    };
    std::vector<std::thread> threads;
    try {
        for (int w = 1; w < num_workers; ++w) threads.emplace_back(work, w);
    } catch (...) {
        next.store(num_tasks);  // started workers stop after their current task
        for (auto& t : threads) t.join();
        throw;
    }
    work(0);
    for (auto& t : threads) t.join();
}

// Per-worker buffers, sized once for the whole call.
struct Scratch {
    explicit Scratch(const PagedShape& s)
        : q(s.group() * s.head_dim), k(s.chunk()), v(s.chunk()), scores(s.group() * s.block_size),
          acc(s.group() * s.head_dim), max(s.group()), sum(s.group()) {}

    std::vector<float> q;       // [group, head_dim] queries of one kv group, pre-scaled
    std::vector<float> k, v;    // [block_size, head_dim] one chunk widened to fp32
    std::vector<float> scores;  // [group, block_size] scores, then probabilities
    std::vector<float> acc;     // [group, head_dim] unnormalised output
    std::vector<float> max;     // [group] running score maximum
    std::vector<float> sum;     // [group] running softmax denominator
};

// Attention of one (row, kv_head): the group's query heads share every K/V line read.
// Online softmax in fp32, updated once per block.
template <class Storage>
void attend_row_group(const float* q, const typename Storage::Raw* k_cache,
                      const typename Storage::Raw* v_cache, const int32_t* block_tables,
                      const int32_t* context_lens, const PagedShape& s, float scale, int64_t row,
                      int64_t kv_head, Scratch& w, float* out) {
    const int64_t group = s.group();
    const int64_t dim = s.head_dim;
    const size_t first_head = static_cast<size_t>(row * s.num_q_heads + kv_head * group);
    const float* q_group = q + first_head * dim;  // [group, head_dim]
    for (int64_t i = 0; i < group * dim; ++i) w.q[i] = q_group[i] * scale;
    std::fill(w.acc.begin(), w.acc.end(), 0.0f);
    std::fill(w.max.begin(), w.max.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.sum.begin(), w.sum.end(), 0.0f);

    const int64_t context = context_lens[row];
    const int32_t* table = block_tables + row * s.max_blocks_per_row;
    for (int64_t b = 0, start = 0; start < context; ++b, start += s.block_size) {
        const int64_t n = std::min(s.block_size, context - start);
        const size_t offset = (static_cast<size_t>(table[b]) * s.num_kv_heads + kv_head) * s.chunk();
        const float* k = to_fp32<Storage>(k_cache + offset, n * dim, w.k.data());  // [n, head_dim]
        const float* v = to_fp32<Storage>(v_cache + offset, n * dim, w.v.data());  // [n, head_dim]

        for (int64_t g = 0; g < group; ++g) {
            const float* qg = w.q.data() + g * dim;
            float* p = w.scores.data() + g * s.block_size;
            float block_max = -std::numeric_limits<float>::infinity();
            for (int64_t t = 0; t < n; ++t) {
                const float* kt = k + t * dim;
                float dot = 0.0f;
                for (int64_t d = 0; d < dim; ++d) dot += qg[d] * kt[d];
                p[t] = dot;
                block_max = std::max(block_max, dot);
            }
            const float new_max = std::max(w.max[g], block_max);
            const float rescale = std::exp(w.max[g] - new_max);  // 0 on the first block
            float block_sum = 0.0f;
            for (int64_t t = 0; t < n; ++t) {
                p[t] = std::exp(p[t] - new_max);
                block_sum += p[t];
            }
            float* acc = w.acc.data() + g * dim;
            for (int64_t d = 0; d < dim; ++d) acc[d] *= rescale;
            w.sum[g] = w.sum[g] * rescale + block_sum;
            w.max[g] = new_max;
        }
        for (int64_t t = 0; t < n; ++t) {
            const float* vt = v + t * dim;
            for (int64_t g = 0; g < group; ++g) {
                const float p = w.scores[g * s.block_size + t];
                float* acc = w.acc.data() + g * dim;
                for (int64_t d = 0; d < dim; ++d) acc[d] += p * vt[d];
            }
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / w.sum[g];
        float* dst = out + (first_head + g) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = w.acc[g * dim + d] * inv;
    }
}

// q [num_rows, num_q_heads, head_dim] fp32; caches [num_blocks, num_kv_heads, block_size,
// head_dim]; block_tables [num_rows, max_blocks_per_row]; context_lens [num_rows] (>= 1);
// out [num_rows, num_q_heads, head_dim] fp32. Tasks are (row, kv_head) pairs.
template <class Storage>
void paged_decode_attention(const float* q, const typename Storage::Raw* k_cache,
                            const typename Storage::Raw* v_cache, const int32_t* block_tables,
                            const int32_t* context_lens, const PagedShape& s, float scale,
                            int num_threads, float* out) {
    const int64_t num_tasks = s.num_rows * s.num_kv_heads;
    const int num_workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tasks)));
    std::vector<Scratch> scratch(num_workers, Scratch(s));
    parallel_for(num_tasks, num_workers, [&](int64_t task, int worker) {
        attend_row_group<Storage>(q, k_cache, v_cache, block_tables, context_lens, s, scale,
                                  task / s.num_kv_heads, task % s.num_kv_heads, scratch[worker], out);
    });
}

// Copies each row's new line [num_kv_heads, head_dim] into its slot (block = slot / block_size,
// offset = slot % block_size) of a cache; element_size bytes per element, any storage dtype.
inline void append_lines(std::byte* cache, const std::byte* lines, const int64_t* slot_mapping,
                         const PagedShape& s, size_t element_size) {
    const size_t line_bytes = static_cast<size_t>(s.head_dim) * element_size;
    for (int64_t row = 0; row < s.num_rows; ++row) {
        const int64_t block = slot_mapping[row] / s.block_size;
        const int64_t offset = slot_mapping[row] % s.block_size;
        for (int64_t h = 0; h < s.num_kv_heads; ++h) {
            const size_t dst = (static_cast<size_t>(block * s.num_kv_heads + h) * s.block_size + offset) * line_bytes;
            const size_t src = static_cast<size_t>(row * s.num_kv_heads + h) * line_bytes;
            std::memcpy(cache + dst, lines + src, line_bytes);
        }
    }
}

}  // namespace apex_serve::cpu_attention
