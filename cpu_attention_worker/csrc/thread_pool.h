// A persistent pool of helper threads that sleep when idle (no OpenMP: its idle threads spin
// and steal the core of the process next door). The calling thread works as worker 0, so a
// call on one thread wakes nobody. After a job a helper spins for `spin_us` before sleeping,
// so back-to-back calls (one per layer) skip the wake-up.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace apex_serve::cpu_attention {

class ThreadPool {
public:
    static ThreadPool& instance();  // never destroyed: helpers may outlive static destructors

    // Runs job(worker) for worker in [0, num_workers) and returns when all have returned; the
    // caller is worker 0. Calls from several threads run one after the other. job must not throw.
    void run(int num_workers, const std::function<void(int)>& job);

    // Helper k (k >= 1) runs on cpus[k % cpus.size()]; empty: no pinning. The calling thread,
    // worker 0, is left alone (pin it from the caller, e.g. os.sched_setaffinity).
    void set_cpus(const std::vector<int>& cpus);
    void set_spin_us(int64_t spin_us);
    int num_helpers();

private:
    ThreadPool() = default;
    void grow(int num_helpers);  // holds call_mutex_
    void helper_loop(int index, uint64_t seen);  // seen: the ticket when it was created
    void pin(std::thread& thread, int index);

    std::mutex call_mutex_;  // one run() at a time
    std::mutex mutex_;       // guards the sleeps below
    std::condition_variable wake_, done_;
    // (run number << 16) | workers of that run, published in one store so that a helper never
    // pairs one run's number with another's worker count.
    std::atomic<uint64_t> ticket_{0};
    std::atomic<int> pending_{0};
    std::atomic<int64_t> spin_us_{50};
    const std::function<void(int)>* job_ = nullptr;  // read only by the workers of the current run
    int sleepers_ = 0;                               // guarded by mutex_
    std::vector<std::thread> helpers_;
    std::vector<int> cpus_;
};

}  // namespace apex_serve::cpu_attention
