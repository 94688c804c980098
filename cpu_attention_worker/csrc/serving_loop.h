// The cpu_attention_worker's side of the shared-memory data plane: one std::thread that waits on
// the doorbell (spin, then futex), and for each request {slot, layer}, in seq order, validates the
// slot's metadata, appends the staged k/v rows to that layer of the KV cache, runs paged decode
// attention from the staged q into the staged o, and publishes done_seq. No Python runs per layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "doorbell.h"
#include "paged_attention.h"

namespace apex_serve::cpu_attention {

// The data plane's shape and the byte offsets of its tensors (computed by data_plane.py's layout()).
struct DataPlaneGeometry {
    int64_t num_layers, num_q_heads, num_kv_heads, head_dim, block_size, num_blocks;
    int64_t max_rows, max_blocks_per_row, num_slots;
    KvDtype dtype;
    // "kv" region: K and V each [num_layers, num_blocks, num_kv_heads, block_size, head_dim]
    int64_t k_cache, v_cache;
    // "staging" region: slot s starts at s * staging_slot_bytes
    int64_t staging_slot_bytes, q, k, v, o;
    // "meta" region: slot s starts at s * meta_slot_bytes
    int64_t meta_slot_bytes, num_rows, block_tables, context_lens, slot_mapping;

    size_t element_size() const { return dtype == KvDtype::kFloat32 ? 4 : 2; }
    size_t layer_bytes() const {
        return static_cast<size_t>(num_blocks * num_kv_heads * block_size * head_dim) * element_size();
    }
};

// Region base addresses, mapped by the caller for the loop's lifetime.
struct DataPlaneRegions {
    std::byte* kv;
    std::byte* staging;
    std::byte* meta;
    Doorbell* doorbell;
};

class ServingLoop {
public:
    // Starts the serving thread. scale of the attention: 1/sqrt(head_dim).
    ServingLoop(const DataPlaneGeometry& geometry, const DataPlaneRegions& regions, Isa isa, int num_threads,
                int64_t spin_us, int64_t prefetch_distance);
    ~ServingLoop();
    ServingLoop(const ServingLoop&) = delete;
    ServingLoop& operator=(const ServingLoop&) = delete;

    void stop();  // idempotent; joins the thread and marks the doorbell stopped

private:
    // A private copy of one slot's metadata, validated (the client may rewrite shared memory).
    struct Meta {
        int64_t num_rows = 0;
        std::vector<int32_t> block_tables;  // [max_rows, max_blocks_per_row], the used prefix of each row
        std::vector<int32_t> context_lens;  // [max_rows]
        std::vector<int64_t> slot_mapping;  // [max_rows]
    };

    void run();
    bool wait_for_ring(uint32_t served);  // false once stop is set
    void serve(uint32_t seq);
    std::string load_meta(const RingEntry& entry);  // "" when valid, else why not
    void compute(uint32_t slot, uint32_t layer);

    DataPlaneGeometry g_;
    DataPlaneRegions r_;
    Isa isa_;
    int num_threads_;
    int64_t spin_us_;
    int64_t prefetch_distance_;
    Meta meta_;
    std::thread thread_;
};

}  // namespace apex_serve::cpu_attention
