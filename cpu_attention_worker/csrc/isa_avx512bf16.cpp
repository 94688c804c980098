// AVX-512 kernels whose bf16 K side runs on AVX512_BF16 dot products (built with the AVX-512
// flags plus -mavx512bf16; called only where the CPU has them). fp32 and fp16 are as in
// isa_avx512.cpp.
#include "simd_table.h"
#include "vec_avx512.h"

namespace apex_serve::cpu_attention {
namespace {

struct Avx512Bf16 : Avx512 {
    static constexpr bool kBf16Pairs = true;
    using Pairs = __m512bh;  // 32 bf16

    static Pairs load_pairs(const uint16_t* p) { return reinterpret_cast<Pairs>(_mm512_loadu_si512(p)); }
    // acc[i] += a[2i] * b[2i] + a[2i + 1] * b[2i + 1], products and sums in fp32.
    static V dot_pairs(V acc, Pairs a, Pairs b) { return _mm512_dpbf16_ps(acc, a, b); }
};

}  // namespace

const IsaKernels& avx512bf16_kernels() {
    static const IsaKernels kernels = simd::isa_table<Avx512Bf16>("avx512bf16", 2 * Avx512Bf16::W);
    return kernels;
}

}  // namespace apex_serve::cpu_attention
