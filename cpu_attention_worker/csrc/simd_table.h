// The IsaKernels table of one vector-traits type: every isa_*.cpp fills it the same way, each
// compiled with its own instruction-set flags.
#pragma once

#include "simd_kernel.h"
#include "simd_probes.h"

namespace apex_serve::cpu_attention::simd {
namespace {

template <class Vec>
IsaKernels isa_table(const char* name, int64_t head_dim_multiple) {
    return IsaKernels{
        name,
        head_dim_multiple,
        {attend_segment<Vec, Float32>, attend_segment<Vec, Float16>, attend_segment<Vec, BFloat16>},
        {read_segment<Vec, Float32>, read_segment<Vec, Float16>, read_segment<Vec, BFloat16>},
        workspace_floats<Vec>,
        read_sum<Vec>,
        fma_loop<Vec>,
        fma_flops_per_iteration<Vec>(),
    };
}

}  // namespace
}  // namespace apex_serve::cpu_attention::simd
