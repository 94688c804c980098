// AVX-512 kernels (built with -mavx512f -mavx512bw -mavx512vl; called only where the CPU has them).
#include "simd_table.h"
#include "vec_avx512.h"

namespace apex_serve::cpu_attention {

const IsaKernels& avx512_kernels() {
    static const IsaKernels kernels = simd::isa_table<Avx512>("avx512", 2 * Avx512::W);
    return kernels;
}

}  // namespace apex_serve::cpu_attention
