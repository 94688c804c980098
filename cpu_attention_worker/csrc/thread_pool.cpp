#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <stdexcept>
#include <string>

namespace apex_serve::cpu_attention {
namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// Spins until done() or spin_us elapse; true if done() held.
template <class Done>
bool spin_until(const Done& done, int64_t spin_us) {
    if (spin_us <= 0) return done();
    const auto deadline = Clock::now() + std::chrono::microseconds(spin_us);
    for (int i = 0;; ++i) {
        if (done()) return true;
        cpu_relax();
        if ((i & 63) == 63 && Clock::now() > deadline) return done();
    }
}

}  // namespace

ThreadPool& ThreadPool::instance() {
    static ThreadPool* pool = new ThreadPool();
    return *pool;
}

int ThreadPool::num_helpers() {
    std::lock_guard<std::mutex> call(call_mutex_);
    return static_cast<int>(helpers_.size());
}

void ThreadPool::set_spin_us(int64_t spin_us) { spin_us_.store(spin_us); }

void ThreadPool::pin(std::thread& thread, int index) {
    if (cpus_.empty()) {  // back to the process's mask (its main thread's)
        cpu_set_t process;
        if (sched_getaffinity(getpid(), sizeof(process), &process) == 0) {
            pthread_setaffinity_np(thread.native_handle(), sizeof(process), &process);
        }
        return;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus_[static_cast<size_t>(index) % cpus_.size()], &set);
    if (pthread_setaffinity_np(thread.native_handle(), sizeof(set), &set) != 0) {
        throw std::invalid_argument("cpus: cannot pin a thread to cpu " + std::to_string(cpus_[index % cpus_.size()]));
    }
}

void ThreadPool::set_cpus(const std::vector<int>& cpus) {
    for (int cpu : cpus) {
        if (cpu < 0 || cpu >= CPU_SETSIZE) {
            throw std::invalid_argument("cpus: cpu " + std::to_string(cpu) + " out of range");
        }
    }
    std::lock_guard<std::mutex> call(call_mutex_);
    cpus_ = cpus;
    for (size_t i = 0; i < helpers_.size(); ++i) pin(helpers_[i], static_cast<int>(i) + 1);
}

void ThreadPool::grow(int num_helpers) {
    while (static_cast<int>(helpers_.size()) < num_helpers) {
        const int index = static_cast<int>(helpers_.size()) + 1;
        const uint64_t seen = ticket_.load(std::memory_order_relaxed);
        helpers_.emplace_back([this, index, seen] { helper_loop(index, seen); });
        if (!cpus_.empty()) pin(helpers_.back(), index);
    }
}

void ThreadPool::run(int num_workers, const std::function<void(int)>& job) {
    if (num_workers > 0xffff) throw std::invalid_argument("num_threads: at most 65535");
    if (num_workers <= 1) {
        job(0);
        return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);
    grow(num_workers - 1);
    job_ = &job;
    pending_.store(num_workers - 1, std::memory_order_relaxed);
    bool sleeping = false;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        const uint64_t next = ((ticket_.load(std::memory_order_relaxed) >> 16) + 1) << 16;
        ticket_.store(next | static_cast<uint64_t>(num_workers), std::memory_order_release);
        sleeping = sleepers_ > 0;
    }
    if (sleeping) wake_.notify_all();
    job(0);
    const auto finished = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(finished, spin_us_.load())) {
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, finished);
    }
    job_ = nullptr;
}

void ThreadPool::helper_loop(int index, uint64_t seen) {
    bool worked = false;  // only a helper that just worked spins; the others sleep at once
    for (;;) {
        const auto woken = [this, &seen] { return ticket_.load(std::memory_order_acquire) != seen; };
        if (!spin_until(woken, worked ? spin_us_.load() : 0)) {
            std::unique_lock<std::mutex> lock(mutex_);
            ++sleepers_;
            wake_.wait(lock, woken);
            --sleepers_;
        }
        seen = ticket_.load(std::memory_order_acquire);
        worked = index < static_cast<int>(seen & 0xffff);
        if (!worked) continue;
        (*job_)(index);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(mutex_);
            done_.notify_one();
        }
    }
}

}  // namespace apex_serve::cpu_attention
