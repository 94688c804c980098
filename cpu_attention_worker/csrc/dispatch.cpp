#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#include "partition.h"
#include "thread_pool.h"

namespace apex_serve::cpu_attention {
namespace {

class AlignedBuffer {
public:
    AlignedBuffer() = default;
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    AlignedBuffer(AlignedBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
        other.data_ = nullptr;
        other.size_ = 0;
    }
    ~AlignedBuffer() { std::free(data_); }

    float* reserve(size_t floats) {
        if (floats > size_) {
            const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
            void* fresh = std::aligned_alloc(64, bytes);
            if (fresh == nullptr) throw std::bad_alloc();
            std::free(data_);
            data_ = static_cast<float*>(fresh);
            size_ = floats;
        }
        return data_;
    }

private:
    float* data_ = nullptr;
    size_t size_ = 0;
};

// Scratch kept between calls (guarded by call_mutex): no allocation or page fault per layer.
struct Scratch {
    std::mutex call_mutex;
    std::vector<AlignedBuffer> workspaces;  // one per worker
    std::vector<float> acc, max, sum;       // partial results of split rows
    std::vector<Segment> segments;
};

Scratch& scratch() {
    static Scratch* instance = new Scratch();
    return *instance;
}

size_t element_size(KvDtype dtype) { return dtype == KvDtype::kFloat32 ? 4 : 2; }

}  // namespace

bool isa_supported(Isa isa) {
    __builtin_cpu_init();
    switch (isa) {
        case Isa::kPortable:
            return true;
        case Isa::kAvx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case Isa::kAvx512:
            return isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
        case Isa::kAvx512Bf16:
            return isa_supported(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    }
    return false;
}

// AVX512_BF16 is not the default: its bf16 dot products beat widening + FMA with the KV in cache
// but lost 5-12% with the KV in DRAM on an EPYC (Zen 4) here, the case that matters.
Isa best_isa() {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
        if (isa_supported(isa)) return isa;
    }
    return Isa::kPortable;
}

const IsaKernels& isa_kernels(Isa isa) {
    switch (isa) {
        case Isa::kAvx512Bf16:
            return avx512bf16_kernels();
        case Isa::kAvx512:
            return avx512_kernels();
        case Isa::kAvx2:
            return avx2_kernels();
        case Isa::kPortable:
            break;
    }
    return portable_kernels();
}

const IsaKernels& kernels_for(Isa isa, int64_t head_dim) {
    const IsaKernels& kernels = isa_kernels(isa);
    if (head_dim % kernels.head_dim_multiple == 0 || isa == Isa::kPortable) return kernels;
    return kernels_for(isa == Isa::kAvx2 ? Isa::kPortable : Isa::kAvx2, head_dim);
}

namespace {

// Plans the pieces, runs kernel over them on the pool and merges split rows into out (unless
// out is null: a read probe that writes nothing).
void run_pieces(const AttentionArgs& args, KvDtype dtype, const IsaKernels& kernels, SegmentKernel kernel,
                int num_threads, float* out) {
    const PagedShape& s = args.shape;
    const int64_t bytes_per_token = 2 * s.num_kv_heads * s.head_dim * static_cast<int64_t>(element_size(dtype));
    const Plan plan = plan_pieces(args.context_lens, s.num_rows, s.block_size, bytes_per_token, num_threads);
    const int num_workers = static_cast<int>(std::min<size_t>(static_cast<size_t>(num_threads), plan.pieces.size()));

    Scratch& state = scratch();
    std::lock_guard<std::mutex> call(state.call_mutex);
    const size_t row_floats = static_cast<size_t>(s.num_q_heads * s.head_dim);
    state.acc.resize(static_cast<size_t>(plan.num_partials) * row_floats);
    state.max.resize(static_cast<size_t>(plan.num_partials * s.num_q_heads));
    state.sum.resize(state.max.size());
    state.segments.clear();
    for (const Piece& piece : plan.pieces) {
        if (piece.partial < 0) {
            float* row_out = out == nullptr ? nullptr : out + piece.row * row_floats;
            state.segments.push_back({piece.row, piece.begin, piece.end, row_out, nullptr, nullptr});
        } else {
            const size_t heads = static_cast<size_t>(piece.partial * s.num_q_heads);
            state.segments.push_back({piece.row, piece.begin, piece.end, state.acc.data() + piece.partial * row_floats,
                                      state.max.data() + heads, state.sum.data() + heads});
        }
    }
    while (state.workspaces.size() < static_cast<size_t>(num_workers)) state.workspaces.emplace_back();
    for (int w = 0; w < num_workers; ++w) state.workspaces[w].reserve(kernels.workspace_floats(s));

    std::atomic<size_t> next{0};
    const size_t count = state.segments.size();
    ThreadPool::instance().run(num_workers, [&](int worker) {
        const Workspace workspace{state.workspaces[worker].reserve(0)};
        for (size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) kernel(args, state.segments[i], workspace);
    });
    if (out != nullptr) {
        merge_partials(plan, state.acc.data(), state.max.data(), state.sum.data(), s.num_q_heads, s.head_dim, out);
    }
}

}  // namespace

void paged_attention(const AttentionArgs& args, KvDtype dtype, Isa isa, int num_threads, float* out) {
    if (args.shape.num_rows == 0) return;
    const IsaKernels& kernels = kernels_for(isa, args.shape.head_dim);
    run_pieces(args, dtype, kernels, kernels.attend[static_cast<int>(dtype)], num_threads, out);
}

void paged_read(const AttentionArgs& args, KvDtype dtype, Isa isa, int num_threads) {
    if (args.shape.num_rows == 0) return;
    const IsaKernels& kernels = kernels_for(isa, args.shape.head_dim);
    run_pieces(args, dtype, kernels, kernels.read[static_cast<int>(dtype)], num_threads, nullptr);
}

void append_lines(std::byte* cache, const std::byte* lines, const int64_t* slot_mapping, const PagedShape& s,
                  size_t element_size) {
    const size_t line_bytes = static_cast<size_t>(s.head_dim) * element_size;
    for (int64_t row = 0; row < s.num_rows; ++row) {
        const int64_t block = slot_mapping[row] / s.block_size;
        const int64_t offset = slot_mapping[row] % s.block_size;
        for (int64_t h = 0; h < s.num_kv_heads; ++h) {
            const size_t dst = (static_cast<size_t>(block * s.num_kv_heads + h) * s.block_size + offset) * line_bytes;
            const size_t src = static_cast<size_t>(row * s.num_kv_heads + h) * line_bytes;
            std::memcpy(cache + dst, lines + src, line_bytes);
        }
    }
}

std::vector<double> read_bandwidth(const float* data, size_t count, int num_threads, int repeats, Isa isa) {
    const IsaKernels& kernels = isa_kernels(isa);
    std::vector<float> sinks(static_cast<size_t>(num_threads));
    std::vector<double> rates;
    for (int r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        ThreadPool::instance().run(num_threads, [&](int worker) {
            const size_t begin = count * worker / num_threads / 16 * 16;
            const size_t end = worker + 1 == num_threads ? count : count * (worker + 1) / num_threads / 16 * 16;
            sinks[worker] = kernels.read_sum(data + begin, end - begin);
        });
        const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
        rates.push_back(static_cast<double>(count * sizeof(float)) / elapsed.count() / 1e9);
    }
    volatile float sink = 0.0f;
    for (float x : sinks) sink = sink + x;
    return rates;
}

double fma_throughput(int num_threads, int64_t iterations, Isa isa) {
    const IsaKernels& kernels = isa_kernels(isa);
    std::vector<double> sinks(static_cast<size_t>(num_threads));
    const auto start = std::chrono::steady_clock::now();
    ThreadPool::instance().run(num_threads, [&](int worker) { sinks[worker] = kernels.fma_loop(iterations); });
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    volatile double sink = 0.0;
    for (double x : sinks) sink = sink + x;
    return static_cast<double>(num_threads) * static_cast<double>(iterations * kernels.fma_flops_per_iteration) /
           elapsed.count() / 1e9;
}

}  // namespace apex_serve::cpu_attention
