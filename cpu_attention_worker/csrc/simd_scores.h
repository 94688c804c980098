// The K side of the kernel: scores of one chunk's tokens for all query heads of a kv group,
// with the queries' columns held in registers across the chunk's K lines, each K line read once.
#pragma once

#include "simd_common.h"

namespace apex_serve::cpu_attention::simd {
namespace {

// partial[m * W + slot(t + j)] (+)= q[m] . k[t + j] over KT vectors of columns, for J lines
// starting at line t and the MR query heads whose columns sit in registers.
template <class Vec, class Storage, int MR, int KT, int J>
APEX_INLINE void score_lines(const typename Storage::Raw* k, int64_t t, int64_t head_dim,
                             const typename Vec::V (&q)[MR][KT], typename Vec::V* partial, bool first) {
    using V = typename Vec::V;
    V line[J][KT];
    for (int j = 0; j < J; ++j) {
        for (int u = 0; u < KT / 2; ++u) {
            Vec::load2(Storage{}, k + (t + j) * head_dim + u * 2 * Vec::W, line[j][2 * u], line[j][2 * u + 1]);
        }
    }
    for (int m = 0; m < MR; ++m) {
        for (int j = 0; j < J; ++j) {
            V* slot = partial + m * Vec::W + Vec::slot(static_cast<int>(t + j));
            V acc = first ? Vec::zero() : *slot;
            for (int c = 0; c < KT; ++c) acc = Vec::fma(q[m][c], line[j][c], acc);
            *slot = acc;
        }
    }
}

// The KT-vector column tile of MR query heads' dot products with `count` (<= W) K lines; the
// heads' columns stay in registers for all lines. Prefetches line t of `ahead` (if any) as it goes.
template <class Vec, class Storage, int MR, int KT>
APEX_INLINE void score_tile(const typename Storage::Raw* k, int64_t count, int64_t head_dim, const float* q,
                            typename Vec::V* partial, bool first, const typename Storage::Raw* ahead) {
    using V = typename Vec::V;
    constexpr int J = Vec::score_lines(MR);
    V qr[MR][KT];
    for (int m = 0; m < MR; ++m) {
        for (int c = 0; c < KT; ++c) qr[m][c] = Vec::load(q + m * head_dim + c * Vec::W);
    }
    int64_t t = 0;
    for (; t + J <= count; t += J) {
        if (ahead != nullptr) {
            for (int j = 0; j < J; ++j) prefetch_line<Storage>(ahead + (t + j) * head_dim, head_dim);
        }
        score_lines<Vec, Storage, MR, KT, J>(k, t, head_dim, qr, partial, first);
    }
    for (; t < count; ++t) {
        if (ahead != nullptr) prefetch_line<Storage>(ahead + t * head_dim, head_dim);
        score_lines<Vec, Storage, MR, KT, 1>(k, t, head_dim, qr, partial, first);
    }
}

// score_tile on bf16 dot products: KU units of 2W stored elements, MR heads' hi and lo query
// pairs in registers ([head][hi: head_dim, lo: head_dim] at q).
template <class Vec, int MR, int KU>
APEX_INLINE void score_tile_pairs(const uint16_t* k, int64_t count, int64_t head_dim, const uint16_t* q,
                                  typename Vec::V* partial, bool first, const uint16_t* ahead) {
    using V = typename Vec::V;
    using P = typename Vec::Pairs;
    constexpr int kUnit = 2 * Vec::W;
    P hi[MR][KU], lo[MR][KU];
    for (int m = 0; m < MR; ++m) {
        for (int u = 0; u < KU; ++u) {
            hi[m][u] = Vec::load_pairs(q + 2 * m * head_dim + u * kUnit);
            lo[m][u] = Vec::load_pairs(q + 2 * m * head_dim + head_dim + u * kUnit);
        }
    }
    for (int64_t t = 0; t < count; ++t) {
        if (ahead != nullptr) prefetch_line<BFloat16>(ahead + t * head_dim, head_dim);
        P line[KU];
        for (int u = 0; u < KU; ++u) line[u] = Vec::load_pairs(k + t * head_dim + u * kUnit);
        for (int m = 0; m < MR; ++m) {
            V* slot = partial + m * Vec::W + Vec::slot(static_cast<int>(t));
            V high = first ? Vec::zero() : *slot, low = Vec::zero();
            for (int u = 0; u < KU; ++u) {
                high = Vec::dot_pairs(high, line[u], hi[m][u]);
                low = Vec::dot_pairs(low, line[u], lo[m][u]);
            }
            *slot = Vec::add(high, low);
        }
    }
}

// All column tiles of MR query heads over `count` K lines.
template <class Vec, class Storage, int MR>
APEX_INLINE void score_heads(const typename Storage::Raw* k, int64_t count, int64_t head_dim, const float* q,
                             typename Vec::V* partial, const typename Storage::Raw* ahead) {
    if constexpr (kBf16Pairs<Vec, Storage>) {
        const auto* pairs = reinterpret_cast<const uint16_t*>(q);
        const int64_t units = head_dim / (2 * Vec::W);
        int64_t u = 0;
        for (; u + 4 <= units; u += 4) {
            score_tile_pairs<Vec, MR, 4>(k + u * 2 * Vec::W, count, head_dim, pairs + u * 2 * Vec::W, partial, u == 0,
                                          u == 0 ? ahead : nullptr);
        }
        for (; u < units; ++u) {
            score_tile_pairs<Vec, MR, 1>(k + u * 2 * Vec::W, count, head_dim, pairs + u * 2 * Vec::W, partial, u == 0,
                                          u == 0 ? ahead : nullptr);
        }
        return;
    }
    constexpr int KT = Vec::score_cols(MR);
    const int64_t vectors = head_dim / Vec::W;  // even: head_dim is a multiple of 2W
    int64_t c = 0;
    for (; c + KT <= vectors; c += KT) {
        score_tile<Vec, Storage, MR, KT>(k + c * Vec::W, count, head_dim, q + c * Vec::W, partial, c == 0,
                                         c == 0 ? ahead : nullptr);
    }
    if constexpr (KT > 4) {
        if (c + 4 <= vectors) {
            score_tile<Vec, Storage, MR, 4>(k + c * Vec::W, count, head_dim, q + c * Vec::W, partial, c == 0, nullptr);
            c += 4;
        }
    }
    if constexpr (KT > 2) {
        if (c < vectors) {
            score_tile<Vec, Storage, MR, 2>(k + c * Vec::W, count, head_dim, q + c * Vec::W, partial, c == 0, nullptr);
        }
    }
}

// scores[g, t] = q[g] . k[t] for the n tokens of one chunk and every query head g of the group;
// entries from n up to the next multiple of W are -inf. Prefetches the chunk `ahead` (or none).
template <class Vec, class Storage>
void chunk_scores(const typename Storage::Raw* k, int64_t n, int64_t head_dim, const float* q, int64_t group,
                  typename Vec::V* partial, float* scores, int64_t padded_block, const typename Storage::Raw* ahead) {
    constexpr int W = Vec::W;
    constexpr int MR = Vec::kScoreRows;
    for (int64_t t0 = 0; t0 < n; t0 += W) {
        const int64_t count = min_of<int64_t>(W, n - t0);
        for (int64_t g = 0; g < group; ++g) {
            for (int64_t t = count; t < W; ++t) partial[g * W + Vec::slot(static_cast<int>(t))] = Vec::zero();
        }
        const auto* lines = k + t0 * head_dim;
        const auto* next = ahead == nullptr ? nullptr : ahead + t0 * head_dim;
        int64_t g = 0;
        for (; g + MR <= group; g += MR) {
            score_heads<Vec, Storage, MR>(lines, count, head_dim, q + g * head_dim, partial + g * W,
                                         g == 0 ? next : nullptr);
        }
        if constexpr (MR > 2) {
            for (; g + 2 <= group; g += 2) {
                score_heads<Vec, Storage, 2>(lines, count, head_dim, q + g * head_dim, partial + g * W,
                                            g == 0 ? next : nullptr);
            }
        }
        for (; g < group; ++g) {
            score_heads<Vec, Storage, 1>(lines, count, head_dim, q + g * head_dim, partial + g * W,
                                        g == 0 ? next : nullptr);
        }
        for (int64_t h = 0; h < group; ++h) Vec::store(scores + h * padded_block + t0, Vec::sum_lanes(partial + h * W));
    }
    for (int64_t g = 0; g < group; ++g) {
        for (int64_t t = n; t < round_up<int64_t>(n, W); ++t) {
            scores[g * padded_block + t] = -std::numeric_limits<float>::infinity();
        }
    }
}

}  // namespace
}  // namespace apex_serve::cpu_attention::simd
