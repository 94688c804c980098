// The paged decode-attention algorithm over vector traits `Vec` (see simd_common.h).
//
// Per segment of a row: queries scaled into storage lane order; then per block: the scores of
// every kv head's chunk for all query heads of its group (each K line read once; the chunks of
// a block lie side by side, so this is one contiguous run), an online-softmax update per query
// head (the accumulator is rescaled only when the running max rises), and the
// probability-weighted V lines added to the accumulators (each V line read once, again one
// run). Each stream prefetches ahead line by line, since a block table's next block is
// anywhere in the pool and the hardware prefetchers stop at page boundaries.
#pragma once

#include "simd_scores.h"

namespace apex_serve::cpu_attention::simd {
namespace {

// Online-softmax step of one block for each query head g: raises the running max (rescaling
// that head's accumulator and sum when it rises), turns the scores into probabilities
// exp(score - max) in place and adds them to the running sum.
template <class Vec>
void block_softmax(float* scores, int64_t n, int64_t padded_block, int64_t heads, int64_t head_dim, float* run_max,
                   float* run_sum, float* acc) {
    using V = typename Vec::V;
    const int64_t vectors = round_up<int64_t>(n, Vec::W) / Vec::W;
    for (int64_t g = 0; g < heads; ++g) {
        float* s = scores + g * padded_block;
        V top = Vec::load(s);
        for (int64_t i = 1; i < vectors; ++i) top = Vec::max(top, Vec::load(s + i * Vec::W));
        const float block_max = Vec::hmax(top);
        if (block_max > run_max[g]) {
            if (run_sum[g] > 0.0f) {
                const V factor = Vec::exp_nonpositive(Vec::set1(run_max[g] - block_max));
                float* a = acc + g * head_dim;
                for (int64_t d = 0; d < head_dim; d += Vec::W) Vec::store(a + d, Vec::mul(Vec::load(a + d), factor));
                run_sum[g] *= Vec::hmax(factor);
            }
            run_max[g] = block_max;
        }
        const V shift = Vec::set1(run_max[g]);
        V total = Vec::zero();
        for (int64_t i = 0; i < vectors; ++i) {
            const V p = Vec::exp_nonpositive(Vec::sub(Vec::load(s + i * Vec::W), shift));
            Vec::store(s + i * Vec::W, p);
            total = Vec::add(total, p);
        }
        run_sum[g] += Vec::hsum(total);
    }
}

// acc[g, cols] += sum_t p[g, t] * v[t, cols] for MR query heads and NR vectors of columns;
// prefetches line t of the chunk `ahead` (or none) as it goes.
template <class Vec, class Storage, int MR, int NR>
APEX_INLINE void value_tile(const typename Storage::Raw* v, int64_t n, int64_t head_dim, const float* p,
                            int64_t padded_block, float* acc, const typename Storage::Raw* ahead) {
    using V = typename Vec::V;
    V sums[MR][NR];
    for (int m = 0; m < MR; ++m) {
        for (int c = 0; c < NR; ++c) sums[m][c] = Vec::load(acc + m * head_dim + c * Vec::W);
    }
    for (int64_t t = 0; t < n; ++t) {
        if (ahead != nullptr) prefetch_line<Storage>(ahead + t * head_dim, head_dim);
        V line[NR];
        for (int u = 0; u < NR / 2; ++u) {
            Vec::load2(Storage{}, v + t * head_dim + u * 2 * Vec::W, line[2 * u], line[2 * u + 1]);
        }
        for (int m = 0; m < MR; ++m) {
            const V weight = Vec::set1(p[m * padded_block + t]);
            for (int c = 0; c < NR; ++c) sums[m][c] = Vec::fma(weight, line[c], sums[m][c]);
        }
    }
    for (int m = 0; m < MR; ++m) {
        for (int c = 0; c < NR; ++c) Vec::store(acc + m * head_dim + c * Vec::W, sums[m][c]);
    }
}

template <class Vec, class Storage, int MR>
APEX_INLINE void value_rows(const typename Storage::Raw* v, int64_t n, int64_t head_dim, const float* p,
                            int64_t padded_block, float* acc, const typename Storage::Raw* ahead) {
    const int64_t vectors = head_dim / Vec::W;
    int64_t c = 0;
    for (; c + Vec::kCols <= vectors; c += Vec::kCols) {
        value_tile<Vec, Storage, MR, Vec::kCols>(v + c * Vec::W, n, head_dim, p, padded_block, acc + c * Vec::W,
                                                 c == 0 ? ahead : nullptr);
    }
    for (; c < vectors; c += 2) {
        value_tile<Vec, Storage, MR, 2>(v + c * Vec::W, n, head_dim, p, padded_block, acc + c * Vec::W,
                                        c == 0 ? ahead : nullptr);
    }
}

// acc[g] += sum_t p[g, t] * v[t] for every query head g of the group over one chunk.
template <class Vec, class Storage>
void chunk_values(const typename Storage::Raw* v, int64_t n, int64_t head_dim, const float* p, int64_t padded_block,
                  int64_t group, float* acc, const typename Storage::Raw* ahead) {
    int64_t g = 0;
    for (; g + Vec::kRows <= group; g += Vec::kRows) {
        value_rows<Vec, Storage, Vec::kRows>(v, n, head_dim, p + g * padded_block, padded_block, acc + g * head_dim,
                                      g == 0 ? ahead : nullptr);
    }
    for (; g + 2 <= group; g += 2) {
        value_rows<Vec, Storage, 2>(v, n, head_dim, p + g * padded_block, padded_block, acc + g * head_dim,
                             g == 0 ? ahead : nullptr);
    }
    for (; g < group; ++g) {
        value_rows<Vec, Storage, 1>(v, n, head_dim, p + g * padded_block, padded_block, acc + g * head_dim,
                             g == 0 ? ahead : nullptr);
    }
}

// Queries scaled into storage lane order, accumulators cleared.
template <class Vec, class Storage>
void start_segment(const float* q_row, float scale, int64_t heads, int64_t head_dim, float* q, float* acc,
                   float* run_max, float* run_sum) {
    constexpr int64_t W = Vec::W;
    if constexpr (kBf16Pairs<Vec, Storage>) {
        auto* pairs = reinterpret_cast<uint16_t*>(q);  // per head: head_dim hi, then head_dim lo
        for (int64_t h = 0; h < heads; ++h) {
            for (int64_t d = 0; d < head_dim; ++d) {
                const float x = q_row[h * head_dim + d] * scale;
                const uint16_t high = bf16_round(x);
                pairs[2 * h * head_dim + d] = high;
                pairs[2 * h * head_dim + head_dim + d] = bf16_round(x - bf16_value(high));
            }
        }
    } else {
        for (int64_t unit = 0; unit < heads * head_dim; unit += 2 * W) {
            for (int64_t half = 0; half < 2; ++half) {
                for (int64_t lane = 0; lane < W; ++lane) {
                    q[unit + half * W + lane] = q_row[unit + unit_element<Storage>(half, lane, W)] * scale;
                }
            }
        }
    }
    for (int64_t i = 0; i < heads * head_dim; ++i) acc[i] = 0.0f;
    for (int64_t h = 0; h < heads; ++h) {
        run_max[h] = -std::numeric_limits<float>::infinity();
        run_sum[h] = 0.0f;
    }
}

// The segment's output back in element order: normalised for a whole row, else the raw
// accumulator with its max and sum.
template <class Vec, class Storage>
void finish_segment(const Segment& segment, int64_t heads, int64_t head_dim, const float* acc, const float* run_max,
                    const float* run_sum) {
    constexpr int64_t W = Vec::W;
    const bool whole_row = segment.max == nullptr;
    for (int64_t h = 0; h < heads; ++h) {
        const float norm = whole_row ? 1.0f / run_sum[h] : 1.0f;
        for (int64_t unit = h * head_dim; unit < (h + 1) * head_dim; unit += 2 * W) {
            for (int64_t half = 0; half < 2; ++half) {
                for (int64_t lane = 0; lane < W; ++lane) {
                    segment.out[unit + unit_element<Storage>(half, lane, W)] = acc[unit + half * W + lane] * norm;
                }
            }
        }
        if (!whole_row) {
            segment.max[h] = run_max[h];
            segment.sum[h] = run_sum[h];
        }
    }
}

// Per block: the scores of all kv heads' K chunks (one contiguous run), the softmax step, then
// the V chunks (another run). Each stream prefetches the chunk `prefetch_distance` ahead of
// the one it reads, in the block table's order.
template <class Vec, class Storage>
void attend_segment(const AttentionArgs& args, const Segment& segment, Workspace workspace) {
    using Raw = typename Storage::Raw;
    using V = typename Vec::V;
    const PagedShape& s = args.shape;
    const int64_t dim = s.head_dim, group = s.group(), kv_heads = s.num_kv_heads, q_heads = s.num_q_heads;
    const size_t chunk = s.chunk();
    const Layout<Vec> layout(s);
    float* q = workspace.data + layout.q;
    float* acc = workspace.data + layout.acc;
    float* run_max = workspace.data + layout.max;
    float* run_sum = workspace.data + layout.sum;
    float* scores = workspace.data + layout.scores;
    V* partial = reinterpret_cast<V*>(workspace.data + layout.partial);
    const float* q_row = args.q + segment.row * q_heads * dim;  // [num_q_heads, head_dim]
    start_segment<Vec, Storage>(q_row, args.scale, q_heads, dim, q, acc, run_max, run_sum);

    const auto* k_cache = static_cast<const Raw*>(args.k_cache);
    const auto* v_cache = static_cast<const Raw*>(args.v_cache);
    const int32_t* table = args.block_tables + segment.row * s.max_blocks_per_row;
    const int64_t first_block = segment.begin / s.block_size;
    const int64_t num_chunks = (segment.end - segment.begin + s.block_size - 1) / s.block_size * kv_heads;
    const auto chunk_offset = [&](int64_t c) {  // c-th chunk of the segment, in block table order
        return (static_cast<size_t>(table[first_block + c / kv_heads]) * kv_heads + c % kv_heads) * chunk;
    };
    const auto ahead = [&](const Raw* cache, int64_t c) -> const Raw* {
        const int64_t target = c + args.prefetch_distance;
        return args.prefetch_distance > 0 && target < num_chunks ? cache + chunk_offset(target) : nullptr;
    };
    for (int64_t c0 = 0; c0 < num_chunks; c0 += kv_heads) {
        const int64_t n = min_of<int64_t>(s.block_size, segment.end - (first_block + c0 / kv_heads) * s.block_size);
        const size_t block_offset = chunk_offset(c0);
        for (int64_t h = 0; h < kv_heads; ++h) {
            float* head_scores = scores + h * group * layout.padded_block;  // [group, padded_block]
            chunk_scores<Vec, Storage>(k_cache + block_offset + h * chunk, n, dim, q + h * group * dim, group, partial,
                                       head_scores, layout.padded_block, ahead(k_cache, c0 + h));
        }
        block_softmax<Vec>(scores, n, layout.padded_block, q_heads, dim, run_max, run_sum, acc);
        for (int64_t h = 0; h < kv_heads; ++h) {
            const float* probs = scores + h * group * layout.padded_block;  // [group, padded_block]
            chunk_values<Vec, Storage>(v_cache + block_offset + h * chunk, n, dim, probs, layout.padded_block, group,
                                       acc + h * group * dim, ahead(v_cache, c0 + h));
        }
    }
    finish_segment<Vec, Storage>(segment, q_heads, dim, acc, run_max, run_sum);
}

}  // namespace
}  // namespace apex_serve::cpu_attention::simd
