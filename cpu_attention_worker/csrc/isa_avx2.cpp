// AVX2 + FMA + F16C kernels (built with -mavx2 -mfma -mf16c; called only where the CPU has them).
#include <immintrin.h>

#include "simd_table.h"

namespace apex_serve::cpu_attention {
namespace {

struct Avx2 {
    using V = __m256;
    static constexpr int W = 8;
    static constexpr bool kBf16Pairs = false;
    // Register tiles sized for the 16 ymm registers: K side 2 heads x 4 vectors of q + 4 of K +
    // 2 sums; V side 2 heads x 4 vectors of sums + 4 of V + 1 weight.
    static constexpr int kScoreRows = 2;
    static constexpr int score_cols(int) { return 4; }
    static constexpr int score_lines(int rows) { return rows == 1 ? 2 : 1; }
    static constexpr int kRows = 2;
    static constexpr int kCols = 4;

    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float x) { return _mm256_set1_ps(x); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

    static float hmax(V x) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
    static float hsum(V x) {
        __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
    }

    // Cephes expf: e^x = 2^n * e^r, |r| <= ln2 / 2, e^r by a degree-7 polynomial (about 1 ulp).
    static V exp_nonpositive(V x) {
        const V live = _mm256_cmp_ps(x, set1(-87.0f), _CMP_GE_OQ);
        x = max(x, set1(-87.0f));
        const V n = _mm256_round_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        V r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
        r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
        V p = set1(1.9875691500e-4f);
        p = fma(p, r, set1(1.3981999507e-3f));
        p = fma(p, r, set1(8.3334519073e-3f));
        p = fma(p, r, set1(4.1665795894e-2f));
        p = fma(p, r, set1(1.6666665459e-1f));
        p = fma(p, r, set1(5.0000001201e-1f));
        const V y = fma(p, mul(r, r), add(r, set1(1.0f)));
        const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_and_ps(mul(y, _mm256_castsi256_ps(exponent)), live);
    }

    static int slot(int i) { return i; }
    static V sum_lanes(const V* v) {
        const V h0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        const V h4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        return add(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
    }

    static void load2(Float32, const float* p, V& a, V& b) {
        a = load(p);
        b = load(p + W);
    }
    static void load2(Float16, const uint16_t* p, V& a, V& b) {
        a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + W)));
    }
    static void load2(BFloat16, const uint16_t* p, V& a, V& b) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        a = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        b = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    }
};

}  // namespace

const IsaKernels& avx2_kernels() {
    static const IsaKernels kernels = simd::isa_table<Avx2>("avx2", 2 * Avx2::W);
    return kernels;
}

}  // namespace apex_serve::cpu_attention
