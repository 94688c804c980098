// Shared by the simd_*.h headers: the paged decode-attention kernel is written once over an
// instruction set's vector traits `Vec` and compiled by each isa_*.cpp with that file's flags.
// Each file defines its Vec in an unnamed namespace and these headers sit in one too (only
// isa_*.cpp include them), so every instantiation has internal linkage: code built with AVX-512
// flags can never be picked by the linker for another file.
//
// Vec provides:
//   V, W                  a vector of W floats
//   zero, set1, load, store, add, sub, mul, max, fma (a * b + c), hmax, hsum
//   exp_nonpositive       e^x for x <= 0; exactly 0 below -87 and for -inf
//   slot, sum_lanes       sum_lanes(v) returns the lane sums of v[slot(0)], ..., v[slot(W - 1)]
//   load2(Storage, p, a, b)  2W stored elements widened to two fp32 vectors, in the storage's lane
//                         order (unit_element below)
//   kScoreRows, score_cols(rows), score_lines(rows)  the K-side register tile: query heads whose
//                         columns stay in registers, column vectors, K lines per step
//   kRows, kCols          the V-side register tile: query heads x vectors of accumulators
//   kBf16Pairs            when true, also Pairs, load_pairs, dot_pairs (see score_tile_pairs)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kv_dtype.h"
#include "paged_attention.h"

#define APEX_INLINE inline __attribute__((always_inline))

namespace apex_serve::cpu_attention::simd {
namespace {

template <class T>
constexpr T round_up(T x, T multiple) {
    return (x + multiple - 1) / multiple * multiple;
}

template <class T>
constexpr T min_of(T a, T b) {
    return a < b ? a : b;
}

// Index within a 2W-element unit of the element that load2 puts in lane `lane` of vector
// `half` (0: a, 1: b). bfloat16 is split into even and odd elements (a shift and a mask widen
// a pair of bf16 in one 32-bit lane); the other dtypes keep their order.
template <class Storage>
constexpr int64_t unit_element(int64_t half, int64_t lane, int64_t width) {
    if constexpr (std::is_same_v<Storage, BFloat16>) return 2 * lane + half;
    return half * width + lane;
}

// Whether the K side of a bf16 cache runs on bf16 dot products (AVX512_BF16): the queries are
// split into bf16 pairs hi + lo (hi = bf16(q), lo = bf16(q - hi), so hi + lo is q to 2^-17) and
// each K line is used as stored, with no widening.
template <class Vec, class Storage>
constexpr bool kBf16Pairs = Vec::kBf16Pairs && std::is_same_v<Storage, BFloat16>;

inline uint16_t bf16_round(float x) {  // round to nearest even (finite x)
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float bf16_value(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
}

// Offsets (in floats, each 64-byte aligned) of a segment's scratch within its workspace.
template <class Vec>
struct Layout {
    explicit Layout(const PagedShape& s)
        : padded_block(round_up<int64_t>(s.block_size, Vec::W)),
          q(0),
          acc(q + aligned(s.num_q_heads * s.head_dim)),
          max(acc + aligned(s.num_q_heads * s.head_dim)),
          sum(max + aligned(s.num_q_heads)),
          scores(sum + aligned(s.num_q_heads)),
          partial(scores + aligned(s.num_q_heads * padded_block)),
          total(partial + aligned(s.group() * Vec::W * Vec::W)) {}

    static size_t aligned(int64_t floats) { return round_up<size_t>(static_cast<size_t>(floats), 16); }

    int64_t padded_block;
    size_t q;        // [num_q_heads, head_dim] scaled queries, storage lane order (or bf16 hi, lo pairs)
    size_t acc;      // [num_q_heads, head_dim] unnormalised output, storage lane order
    size_t max;      // [num_q_heads] running score max
    size_t sum;      // [num_q_heads] running softmax denominator
    size_t scores;   // [num_q_heads, padded_block] scores, then probabilities, of one block
    size_t partial;  // [group, W] vectors: per-token partial dot products awaiting sum_lanes
    size_t total;
};

template <class Vec>
size_t workspace_floats(const PagedShape& s) {
    return Layout<Vec>(s).total;
}

// Prefetches one K or V line (head_dim elements) of a chunk that comes later in its stream, into
// L2 (prefetcht1: measured better here than t0 or nta).
template <class Storage>
APEX_INLINE void prefetch_line(const typename Storage::Raw* line, int64_t head_dim) {
    const auto* bytes = reinterpret_cast<const char*>(line);
    const int64_t size = head_dim * static_cast<int64_t>(sizeof(typename Storage::Raw));
    for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset, 0, 2);
}

}  // namespace
}  // namespace apex_serve::cpu_attention::simd
