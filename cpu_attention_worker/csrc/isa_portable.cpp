// Portable kernels: the algorithm of simd_kernel.h on one-lane "vectors" (plain floats), built
// without instruction-set flags; the fallback on any CPU and for head dims the SIMD files skip.
#include <algorithm>
#include <cmath>

#include "simd_table.h"

namespace apex_serve::cpu_attention {
namespace {

struct Scalar {
    using V = float;
    static constexpr int W = 1;
    static constexpr bool kBf16Pairs = false;  // one-lane tiles: plain scalar loops
    static constexpr int kScoreRows = 2;
    static constexpr int score_cols(int) { return 4; }
    static constexpr int score_lines(int rows) { return rows == 1 ? 2 : 1; }
    static constexpr int kRows = 4;
    static constexpr int kCols = 4;

    static V zero() { return 0.0f; }
    static V set1(float x) { return x; }
    static V load(const float* p) { return *p; }
    static void store(float* p, V x) { *p = x; }
    static V add(V a, V b) { return a + b; }
    static V sub(V a, V b) { return a - b; }
    static V mul(V a, V b) { return a * b; }
    static V max(V a, V b) { return std::max(a, b); }
    static V fma(V a, V b, V c) { return a * b + c; }
    static float hmax(V x) { return x; }
    static float hsum(V x) { return x; }
    static V exp_nonpositive(V x) { return x >= -87.0f ? std::exp(x) : 0.0f; }
    static int slot(int i) { return i; }
    static V sum_lanes(const V* v) { return v[0]; }

    static void load2(Float32, const float* p, V& a, V& b) {
        a = p[0];
        b = p[1];
    }
    static void load2(Float16, const uint16_t* p, V& a, V& b) {
        a = fp16_to_fp32(p[0]);
        b = fp16_to_fp32(p[1]);
    }
    static void load2(BFloat16, const uint16_t* p, V& a, V& b) {
        a = bf16_to_fp32(p[0]);
        b = bf16_to_fp32(p[1]);
    }
};

}  // namespace

const IsaKernels& portable_kernels() {
    static const IsaKernels kernels = simd::isa_table<Scalar>("portable", 2);
    return kernels;
}

}  // namespace apex_serve::cpu_attention
