#include "serving_loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>

#include "dispatch.h"

namespace apex_serve::cpu_attention {

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kSleepSliceNs = 100'000'000;  // a sleeping server rechecks the stop flag this often

std::string num(int64_t value) { return std::to_string(value); }

template <typename T>
const T* at(const std::byte* base, int64_t offset) {
    return reinterpret_cast<const T*>(base + offset);
}

}  // namespace

ServingLoop::ServingLoop(const DataPlaneGeometry& geometry, const DataPlaneRegions& regions, Isa isa,
                         int num_threads, int64_t spin_us, int64_t prefetch_distance)
    : g_(geometry),
      r_(regions),
      isa_(isa),
      num_threads_(num_threads),
      spin_us_(spin_us),
      prefetch_distance_(prefetch_distance) {
    meta_.block_tables.resize(static_cast<size_t>(g_.max_rows * g_.max_blocks_per_row));
    meta_.context_lens.resize(static_cast<size_t>(g_.max_rows));
    meta_.slot_mapping.resize(static_cast<size_t>(g_.max_rows));
    Doorbell& d = *r_.doorbell;
    d.stop.value.store(0, std::memory_order_relaxed);
    d.server_pid.value.store(static_cast<uint32_t>(getpid()), std::memory_order_relaxed);
    d.magic.value.store(kDoorbellMagic, std::memory_order_relaxed);
    d.state.value.store(static_cast<uint32_t>(ServerState::kRunning), std::memory_order_release);
    thread_ = std::thread([this] { run(); });
}

ServingLoop::~ServingLoop() { stop(); }

void ServingLoop::stop() {
    Doorbell& d = *r_.doorbell;
    if (!thread_.joinable()) return;
    d.stop.value.store(1, std::memory_order_seq_cst);
    futex_wake_all(d.ring_seq.value);
    thread_.join();
    d.state.value.store(static_cast<uint32_t>(ServerState::kStopped), std::memory_order_seq_cst);
    futex_wake_all(d.done_seq.value);  // a waiting client sees the state at once
}

void ServingLoop::run() {
    Doorbell& d = *r_.doorbell;
    uint32_t served = d.done_seq.value.load(std::memory_order_acquire);
    while (wait_for_ring(served)) {
        const uint32_t rung = d.ring_seq.value.load(std::memory_order_acquire);
        while (served != rung) {
            ++served;
            serve(served);
            d.done_seq.value.store(served, std::memory_order_seq_cst);
            if (d.client_waiting.value.load(std::memory_order_seq_cst) != 0) futex_wake_all(d.done_seq.value);
        }
    }
}

bool ServingLoop::wait_for_ring(uint32_t served) {
    Doorbell& d = *r_.doorbell;
    const auto spin_until = Clock::now() + std::chrono::microseconds(spin_us_);
    while (true) {
        if (d.stop.value.load(std::memory_order_acquire) != 0) return false;
        if (d.ring_seq.value.load(std::memory_order_acquire) != served) return true;
        if (Clock::now() < spin_until) {
            cpu_relax();
            continue;
        }
        // Raise the flag, then recheck: a client that bumps ring_seq after this sees the flag and
        // wakes us; one that bumped it before makes FUTEX_WAIT return at once (value differs).
        d.server_sleeping.value.store(1, std::memory_order_seq_cst);
        if (d.ring_seq.value.load(std::memory_order_seq_cst) == served && d.stop.value.load() == 0) {
            futex_wait(d.ring_seq.value, served, kSleepSliceNs);
        }
        d.server_sleeping.value.store(0, std::memory_order_relaxed);
    }
}

void ServingLoop::serve(uint32_t seq) {
    Doorbell& d = *r_.doorbell;
    RingEntry& entry = d.ring[seq % kRingEntries];
    const auto start = Clock::now();
    std::string problem;
    try {
        problem = load_meta(entry);
        if (problem.empty()) compute(entry.slot, entry.layer);
    } catch (const std::exception& e) {
        problem = std::string("internal error: ") + e.what();
    }
    if (problem.empty()) {
        entry.status = static_cast<uint32_t>(RequestStatus::kOk);
    } else {
        std::snprintf(entry.message, kMessageBytes, "%s", problem.c_str());
        entry.status = static_cast<uint32_t>(RequestStatus::kRejected);
    }
    const auto end = Clock::now();
    entry.start_ns = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(start.time_since_epoch()).count());
    entry.end_ns = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(end.time_since_epoch()).count());
    if (entry.slot < g_.num_slots) {
        const auto elapsed = std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count();
        std::atomic<uint64_t>& busy = d.busy_ns[entry.slot].value;
        busy.store(busy.load(std::memory_order_relaxed) + static_cast<uint64_t>(elapsed), std::memory_order_relaxed);
    }
}

std::string ServingLoop::load_meta(const RingEntry& entry) {
    if (entry.slot >= g_.num_slots) return "slot " + num(entry.slot) + " outside [0, " + num(g_.num_slots) + ")";
    if (entry.layer >= g_.num_layers) {
        return "layer " + num(entry.layer) + " outside [0, " + num(g_.num_layers) + ")";
    }
    const std::byte* base = r_.meta + entry.slot * g_.meta_slot_bytes;
    const int64_t rows = *at<int32_t>(base, g_.num_rows);
    if (rows < 0 || rows > g_.max_rows) return "num_rows " + num(rows) + " outside [0, " + num(g_.max_rows) + "]";
    const int32_t* tables = at<int32_t>(base, g_.block_tables);
    const int32_t* lens = at<int32_t>(base, g_.context_lens);
    const int64_t* slots = at<int64_t>(base, g_.slot_mapping);
    const int64_t capacity = g_.max_blocks_per_row * g_.block_size;
    const int64_t num_cache_slots = g_.num_blocks * g_.block_size;
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t len = lens[row];
        if (len < 1 || len > capacity) {
            return "context_lens[" + num(row) + "] " + num(len) + " outside [1, " + num(capacity) + "]";
        }
        const int64_t slot = slots[row];
        if (slot < 0 || slot >= num_cache_slots) {
            return "slot_mapping[" + num(row) + "] " + num(slot) + " outside [0, " + num(num_cache_slots) + ")";
        }
        const int64_t used = (len + g_.block_size - 1) / g_.block_size;
        int32_t* copy = meta_.block_tables.data() + row * g_.max_blocks_per_row;
        std::copy_n(tables + row * g_.max_blocks_per_row, used, copy);
        for (int64_t b = 0; b < used; ++b) {
            if (copy[b] < 0 || copy[b] >= g_.num_blocks) {
                return "block_tables[" + num(row) + ", " + num(b) + "] block id " + num(copy[b]) + " outside [0, " +
                       num(g_.num_blocks) + ")";
            }
        }
        meta_.context_lens[static_cast<size_t>(row)] = static_cast<int32_t>(len);
        meta_.slot_mapping[static_cast<size_t>(row)] = slot;
    }
    meta_.num_rows = rows;
    return "";
}

void ServingLoop::compute(uint32_t slot, uint32_t layer) {
    if (meta_.num_rows == 0) return;
    const PagedShape shape{meta_.num_rows, g_.num_q_heads,  g_.num_kv_heads,      g_.head_dim,
                           g_.num_blocks,  g_.block_size,   g_.max_blocks_per_row};
    const size_t layer_offset = layer * g_.layer_bytes();
    std::byte* k_cache = r_.kv + g_.k_cache + layer_offset;  // [num_blocks, num_kv_heads, block_size, head_dim]
    std::byte* v_cache = r_.kv + g_.v_cache + layer_offset;
    std::byte* staging = r_.staging + slot * g_.staging_slot_bytes;
    const int64_t* slots = meta_.slot_mapping.data();
    append_lines(k_cache, staging + g_.k, slots, shape, g_.element_size());  // k [max_rows, num_kv_heads, head_dim]
    append_lines(v_cache, staging + g_.v, slots, shape, g_.element_size());
    const AttentionArgs args{reinterpret_cast<const float*>(staging + g_.q),  // [max_rows, num_q_heads, head_dim]
                             k_cache,
                             v_cache,
                             meta_.block_tables.data(),
                             meta_.context_lens.data(),
                             shape,
                             static_cast<float>(1.0 / std::sqrt(static_cast<double>(g_.head_dim))),
                             prefetch_distance_};
    paged_attention(args, g_.dtype, isa_, num_threads_, reinterpret_cast<float*>(staging + g_.o));
}

}  // namespace apex_serve::cpu_attention
