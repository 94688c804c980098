// The doorbell: one 4 KiB shared-memory page of control words between the gpu_worker (client)
// and the cpu_attention_worker's serving thread, each word on its own 64-byte line. The client
// writes request entries and bumps ring_seq; the server serves them in seq order and publishes
// done_seq. Both sequence words are futex words (shared, not FUTEX_PRIVATE): a side sleeps on
// one only after raising its sleeping/waiting flag, so the other side calls FUTEX_WAKE only then.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <ctime>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace apex_serve::cpu_attention {

constexpr uint32_t kDoorbellMagic = 0x41505844;  // "APXD", written by the server when it starts
constexpr size_t kDoorbellBytes = 4096;
constexpr size_t kCacheLine = 64;
constexpr uint32_t kRingEntries = 8;  // requests the client may have outstanding
constexpr uint32_t kMaxSlots = 8;
constexpr size_t kMessageBytes = 224;

enum class ServerState : uint32_t { kCreated = 0, kRunning = 1, kStopped = 2 };
enum class RequestStatus : uint32_t { kOk = 0, kRejected = 1 };

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "shared-memory atomics must be lock free (address free)");

struct alignas(kCacheLine) Word32 {
    std::atomic<uint32_t> value;
};
struct alignas(kCacheLine) Word64 {
    std::atomic<uint64_t> value;
};

// One request, written by the client before it publishes ring_seq; status, the serving interval
// and message written by the server before it publishes done_seq.
struct alignas(kCacheLine) RingEntry {
    uint32_t slot;
    uint32_t layer;
    uint32_t status;                // RequestStatus
    uint32_t reserved;
    uint64_t start_ns;              // CLOCK_MONOTONIC (steady_clock) when serving began and ended: the
    uint64_t end_ns;                // client reads them for its per-layer timeline, no clock of its own
    char message[kMessageBytes];    // NUL-terminated reason when status is kRejected
};

struct Doorbell {
    Word32 magic;
    Word32 ring_seq;        // futex word: last request rung (client)
    Word32 done_seq;        // futex word: last request served (server)
    Word32 server_sleeping; // 1 while the server may sleep on ring_seq
    Word32 client_waiting;  // 1 while the client may sleep on done_seq
    Word32 server_pid;
    Word32 state;           // ServerState
    Word32 stop;            // 1: the serving thread exits
    Word64 busy_ns[kMaxSlots];  // per slot: the serving thread's cumulative append + attention time
    RingEntry ring[kRingEntries];  // request seq at ring[seq % kRingEntries]
};

static_assert(sizeof(RingEntry) == 256, "ring entries are four cache lines");
static_assert(sizeof(Doorbell) <= kDoorbellBytes, "the doorbell fits one page");

// Sleeps while *word == expected, for at most timeout_ns (spurious wake-ups allowed).
inline void futex_wait(std::atomic<uint32_t>& word, uint32_t expected, int64_t timeout_ns) {
    timespec timeout{static_cast<time_t>(timeout_ns / 1'000'000'000), static_cast<long>(timeout_ns % 1'000'000'000)};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT, expected, &timeout, nullptr, 0);
}

inline void futex_wake_all(std::atomic<uint32_t>& word) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// a at or after b in wrapping u32 sequence order
inline bool seq_reached(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) >= 0; }

}  // namespace apex_serve::cpu_attention
