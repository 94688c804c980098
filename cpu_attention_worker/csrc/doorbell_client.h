// The gpu_worker's side of the doorbell: ring(slot, layer) publishes a request, wait(seq) blocks
// (spin, then futex slices) until the server has served it, the deadline passes, or the server
// process is gone. Single writer: one client rings a data plane.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "doorbell.h"

namespace apex_serve::cpu_attention {

// Why a request did not complete: a timeout, a dead or stopped server, or a rejected request.
class DataPlaneError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class DoorbellClient {
public:
    DoorbellClient(Doorbell* doorbell, uint32_t num_slots, uint32_t num_layers, int64_t spin_us);

    uint32_t ring(uint32_t slot, uint32_t layer);  // the request's seq; std::invalid_argument on bad input
    // DataPlaneError unless served without error. Wait for a seq before ringing kRingEntries more:
    // its entry (and so its error status) is reused after that.
    void wait(uint32_t seq, double timeout_s);
    uint64_t busy_ns(uint32_t slot) const;
    // When the server began and ended serving seq (CLOCK_MONOTONIC ns). Valid after wait(seq) and until
    // kRingEntries more requests are rung.
    std::pair<uint64_t, uint64_t> served_interval(uint32_t seq) const;

private:
    std::string describe(uint32_t seq) const;  // "layer L (slot S, seq N)"
    void check_server(uint32_t seq, bool check_pid) const;  // DataPlaneError when the server stopped or died
    void check_result(uint32_t seq) const;     // DataPlaneError when the server rejected the request

    Doorbell* d_;
    uint32_t num_slots_;
    uint32_t num_layers_;
    int64_t spin_us_;
};

}  // namespace apex_serve::cpu_attention
