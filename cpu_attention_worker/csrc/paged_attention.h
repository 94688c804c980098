// Interface shared by the ISA translation units (isa_*.cpp), the dispatcher and the bindings.
// Nothing here depends on an instruction set; the kernels behind the function pointers do.
//
// One layer's cache, K and V each [num_blocks, num_kv_heads, block_size, head_dim], so one
// (block, kv_head) chunk is a contiguous block_size x head_dim run (DESIGN.md section 4), and
// the chunks of one block's kv heads follow each other.
#pragma once

#include <cstddef>
#include <cstdint>

namespace apex_serve::cpu_attention {

enum class KvDtype { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

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

// Arguments of one attention call, already validated.
struct AttentionArgs {
    const float* q;               // [num_rows, num_q_heads, head_dim]
    const void* k_cache;          // [num_blocks, num_kv_heads, block_size, head_dim] storage dtype
    const void* v_cache;          // [num_blocks, num_kv_heads, block_size, head_dim] storage dtype
    const int32_t* block_tables;  // [num_rows, max_blocks_per_row]
    const int32_t* context_lens;  // [num_rows]
    PagedShape shape;
    float scale;
    int64_t prefetch_distance;  // chunks ahead that each stream prefetches; 0: none
};

// Tokens [begin, end) of one row, begin a multiple of block_size. A segment that covers its
// whole row writes the normalised output to out ([num_q_heads, head_dim]); a part of a split
// row writes its unnormalised accumulator to out and its running max and softmax sum per query
// head to max and sum ([num_q_heads] each), merged afterwards (log-sum-exp rescaling).
struct Segment {
    int64_t row;
    int64_t begin;
    int64_t end;
    float* out;
    float* max;  // nullptr for a whole row
    float* sum;  // nullptr for a whole row
};

// Per-thread scratch of a segment kernel, 64-byte aligned; sized by workspace_floats().
struct Workspace {
    float* data;
};

using SegmentKernel = void (*)(const AttentionArgs& args, const Segment& segment, Workspace workspace);

// One instruction set's kernels: attention per storage dtype, plus the two probes the
// benchmark uses as anchors (a streaming read and an FMA loop), compiled with the same flags.
struct IsaKernels {
    const char* name;
    int64_t head_dim_multiple;         // head_dim must be a multiple of this for these kernels
    SegmentKernel attend[3];           // indexed by KvDtype
    SegmentKernel read[3];             // the same reads without the arithmetic (a benchmark probe)
    size_t (*workspace_floats)(const PagedShape& shape);
    float (*read_sum)(const float* data, size_t count);   // sum of count floats, several chains
    double (*fma_loop)(int64_t iterations);               // returns a value that depends on the work
    int64_t fma_flops_per_iteration;
};

const IsaKernels& portable_kernels();
const IsaKernels& avx2_kernels();    // call only where the CPU has AVX2, FMA and F16C
const IsaKernels& avx512_kernels();  // call only where the CPU has AVX-512 F/BW/VL
const IsaKernels& avx512bf16_kernels();  // ... and AVX512_BF16

}  // namespace apex_serve::cpu_attention
