// The AVX-512 vector traits of simd_kernel.h, shared by isa_avx512.cpp and isa_avx512bf16.cpp.
// Only those files include it (each builds it with its own flags): the unnamed namespace keeps
// every instantiation private to its file.
#pragma once

#include <immintrin.h>

#include "kv_dtype.h"

// GCC 12 flags its own _mm512_undefined_ps inside the reduce and shuffle intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace apex_serve::cpu_attention {
namespace {

struct Avx512 {
    using V = __m512;
    static constexpr int W = 16;
    // Whole 128-dim rows per tile (2 heads x 8 vectors of q in registers; 2 heads x 8 vectors of
    // V sums): each K and V line is read in one pass, which the prefetchers follow better than
    // half rows (about +10% from DRAM on fp32).
    static constexpr bool kBf16Pairs = false;
    static constexpr int kScoreRows = 2;
    static constexpr int score_cols(int) { return 8; }
    static constexpr int score_lines(int rows) { return rows == 1 ? 2 : 1; }
    static constexpr int kRows = 2;
    static constexpr int kCols = 8;

    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float x) { return _mm512_set1_ps(x); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static float hmax(V x) { return _mm512_reduce_max_ps(x); }
    static float hsum(V x) { return _mm512_reduce_add_ps(x); }

    // Cephes expf: e^x = 2^n * e^r, |r| <= ln2 / 2, e^r by a degree-7 polynomial (about 1 ulp).
    static V exp_nonpositive(V x) {
        const __mmask16 live = _mm512_cmp_ps_mask(x, set1(-87.0f), _CMP_GE_OQ);
        x = max(x, set1(-87.0f));
        const V n =
            _mm512_roundscale_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        V r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
        r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
        V p = set1(1.9875691500e-4f);
        p = fma(p, r, set1(1.3981999507e-3f));
        p = fma(p, r, set1(8.3334519073e-3f));
        p = fma(p, r, set1(4.1665795894e-2f));
        p = fma(p, r, set1(1.6666665459e-1f));
        p = fma(p, r, set1(5.0000001201e-1f));
        const V y = fma(p, mul(r, r), add(r, set1(1.0f)));
        return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n));
    }

    // sum_lanes reduces 16 vectors in four halving steps; its output lane 4k + m holds input
    // 4m + k, so token t goes to slot 4 (t % 4) + t / 4 to come out in order.
    static int slot(int t) { return 4 * (t % 4) + t / 4; }
    static V sum_lanes(const V* v) {
        V halves[8], quarters[4];
        for (int i = 0; i < 8; ++i) {
            halves[i] = add(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                            _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
        }
        for (int i = 0; i < 4; ++i) {
            quarters[i] = add(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xdd));
        }
        const V pairs0 = add(_mm512_shuffle_ps(quarters[0], quarters[1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(quarters[0], quarters[1], _MM_SHUFFLE(3, 2, 3, 2)));
        const V pairs1 = add(_mm512_shuffle_ps(quarters[2], quarters[3], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(quarters[2], quarters[3], _MM_SHUFFLE(3, 2, 3, 2)));
        return add(_mm512_shuffle_ps(pairs0, pairs1, _MM_SHUFFLE(2, 0, 2, 0)),
                   _mm512_shuffle_ps(pairs0, pairs1, _MM_SHUFFLE(3, 1, 3, 1)));
    }

    static void load2(Float32, const float* p, V& a, V& b) {
        a = load(p);
        b = load(p + W);
    }
    static void load2(Float16, const uint16_t* p, V& a, V& b) {
        a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + W)));
    }
    static void load2(BFloat16, const uint16_t* p, V& a, V& b) {
        const __m512i pairs = _mm512_loadu_si512(p);
        a = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        b = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
};

}  // namespace
}  // namespace apex_serve::cpu_attention
