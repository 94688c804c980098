#include "doorbell_client.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <sstream>

namespace apex_serve::cpu_attention {

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kWaitSliceNs = 10'000'000;  // a sleeping client rechecks deadline and server this often
constexpr double kMaxTimeoutS = 1e7;          // longer timeouts wait this long (no clock overflow)

// kill(pid, 0) says a zombie is alive; /proc says it is not.
bool process_alive(pid_t pid) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren == std::string::npos || paren + 2 >= text.size()) return true;  // no /proc: trust kill()
    const char state = text[paren + 2];
    return state != 'Z' && state != 'X';
}

}  // namespace

DoorbellClient::DoorbellClient(Doorbell* doorbell, uint32_t num_slots, uint32_t num_layers, int64_t spin_us)
    : d_(doorbell), num_slots_(num_slots), num_layers_(num_layers), spin_us_(spin_us) {
    if (d_->magic.value.load(std::memory_order_acquire) != kDoorbellMagic) {
        throw DataPlaneError("the doorbell region was not initialised by a cpu_attention_worker serving loop");
    }
}

uint32_t DoorbellClient::ring(uint32_t slot, uint32_t layer) {
    if (slot >= num_slots_) {
        throw std::invalid_argument("slot: " + std::to_string(slot) + " outside [0, " + std::to_string(num_slots_) +
                                    ")");
    }
    if (layer >= num_layers_) {
        throw std::invalid_argument("layer: " + std::to_string(layer) + " outside [0, " +
                                    std::to_string(num_layers_) + ")");
    }
    const uint32_t seq = d_->ring_seq.value.load(std::memory_order_relaxed) + 1;
    if (seq - d_->done_seq.value.load(std::memory_order_acquire) > kRingEntries) {
        throw DataPlaneError("layer " + std::to_string(layer) + ": more than " + std::to_string(kRingEntries) +
                             " requests outstanding; wait for earlier ones first");
    }
    RingEntry& entry = d_->ring[seq % kRingEntries];
    entry.slot = slot;
    entry.layer = layer;
    d_->ring_seq.value.store(seq, std::memory_order_seq_cst);
    if (d_->server_sleeping.value.load(std::memory_order_seq_cst) != 0) futex_wake_all(d_->ring_seq.value);
    return seq;
}

void DoorbellClient::wait(uint32_t seq, double timeout_s) {
    if (!(timeout_s >= 0.0)) throw std::invalid_argument("timeout_s: must be >= 0, got " + std::to_string(timeout_s));
    std::atomic<uint32_t>& done = d_->done_seq.value;
    const auto start = Clock::now();
    const std::chrono::duration<double> limit(std::min(timeout_s, kMaxTimeoutS));
    const auto deadline = start + std::chrono::duration_cast<Clock::duration>(limit);
    const auto spin_until = std::min(deadline, start + std::chrono::microseconds(spin_us_));
    bool slept = false;  // the pid check reads /proc: only once a sleep slice passed without the result
    while (!seq_reached(done.load(std::memory_order_acquire), seq)) {
        const auto now = Clock::now();
        if (now < spin_until) {
            cpu_relax();
            continue;
        }
        check_server(seq, slept);
        if (now >= deadline) {
            std::ostringstream message;
            message << "cpu_attention_worker timed out on " << describe(seq) << " after " << timeout_s << " s";
            throw DataPlaneError(message.str());
        }
        const uint32_t seen = done.load(std::memory_order_seq_cst);
        d_->client_waiting.value.store(1, std::memory_order_seq_cst);
        if (!seq_reached(done.load(std::memory_order_seq_cst), seq)) {
            const int64_t left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
            futex_wait(done, seen, std::max<int64_t>(1, std::min(kWaitSliceNs, left)));
        }
        d_->client_waiting.value.store(0, std::memory_order_relaxed);
        slept = true;
    }
    check_result(seq);
}

uint64_t DoorbellClient::busy_ns(uint32_t slot) const {
    if (slot >= num_slots_) {
        throw std::invalid_argument("slot: " + std::to_string(slot) + " outside [0, " + std::to_string(num_slots_) +
                                    ")");
    }
    return d_->busy_ns[slot].value.load(std::memory_order_relaxed);
}

std::pair<uint64_t, uint64_t> DoorbellClient::served_interval(uint32_t seq) const {
    if (!seq_reached(d_->done_seq.value.load(std::memory_order_acquire), seq)) {
        throw std::invalid_argument("seq: " + std::to_string(seq) + " has not been served yet");
    }
    const RingEntry& entry = d_->ring[seq % kRingEntries];
    return {entry.start_ns, entry.end_ns};
}

std::string DoorbellClient::describe(uint32_t seq) const {
    const RingEntry& entry = d_->ring[seq % kRingEntries];
    std::ostringstream out;
    out << "layer " << entry.layer << " (slot " << entry.slot << ", seq " << seq << ")";
    return out.str();
}

void DoorbellClient::check_server(uint32_t seq, bool check_pid) const {
    const auto pid = static_cast<pid_t>(d_->server_pid.value.load(std::memory_order_relaxed));
    if (d_->state.value.load(std::memory_order_acquire) == static_cast<uint32_t>(ServerState::kStopped)) {
        throw DataPlaneError("cpu_attention_worker (pid " + std::to_string(pid) + ") stopped its serving loop before " +
                             describe(seq) + " completed");
    }
    if (check_pid && !process_alive(pid)) {
        throw DataPlaneError("cpu_attention_worker (pid " + std::to_string(pid) + ") died before " + describe(seq) +
                             " completed");
    }
}

void DoorbellClient::check_result(uint32_t seq) const {
    const RingEntry& entry = d_->ring[seq % kRingEntries];
    if (entry.status == static_cast<uint32_t>(RequestStatus::kOk)) return;
    throw DataPlaneError("cpu_attention_worker rejected " + describe(seq) + ": " +
                         std::string(entry.message, strnlen(entry.message, kMessageBytes)));
}

}  // namespace apex_serve::cpu_attention
