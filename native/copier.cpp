// Background copies of admitted experts into their device slots (expert rotation).
#include "scheduler.h"

#include <chrono>
#include <cstring>

namespace rotary {

void Copier::start(const Scheduler * owner, ggml_backend_t backend, ggml_backend_buffer_type_t staging_type) {
    owner_ = owner;
    backend_ = backend;
    staging_type_ = staging_type;
    thread_ = std::thread(&Copier::run, this);
}

void Copier::stop() {
    if (!thread_.joinable()) {
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        quit_ = true;
    }
    wake_.notify_all();
    thread_.join();
    ggml_backend_buffer_free(staging_);
    staging_ = nullptr;
}

void Copier::submit(const CopyJob & job) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back(job);
    }
    wake_.notify_all();
}

uint64_t Copier::wait() {
    const auto started = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return queue_.empty() && !busy_; });
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started)
        .count();
}

size_t Copier::staging_bytes() const {
    return staging_ ? ggml_backend_buffer_get_size(staging_) : 0;
}

void Copier::run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
        wake_.wait(lock, [this] { return quit_ || !queue_.empty(); });
        if (quit_) {
            return;
        }
        std::vector<CopyJob> jobs;
        jobs.swap(queue_);
        busy_ = true;
        lock.unlock();
        copy(jobs);
        lock.lock();
        busy_ = false;
        done_.notify_all();
    }
}

// The slots being written are out of the slot table until commit, so no compute reads them meanwhile.
void Copier::copy(const std::vector<CopyJob> & jobs) {
    const Scheduler & s = *owner_;
    size_t total = 0;
    for (const CopyJob & job : jobs) {
        total += s.layers.at(job.layer).slot_bytes;
    }
    if (staging_type_ && (!staging_ || ggml_backend_buffer_get_size(staging_) < total)) {
        ggml_backend_buffer_free(staging_);
        staging_ = ggml_backend_buft_alloc_buffer(staging_type_, total);
    }
    uint8_t * staging = staging_ ? (uint8_t *) ggml_backend_buffer_get_base(staging_) : nullptr;
    for (const CopyJob & job : jobs) {
        for (int i : s.layers.at(job.layer).tensors) {
            const ExpertTensor & t = s.tensors[i];
            const uint8_t * block = s.files[t.file].base + t.offset + (uint64_t) job.expert * t.expert_bytes;
            const size_t offset = (size_t) job.slot * t.expert_bytes;
            if (staging) {  // pinned memory: the device copies it asynchronously
                std::memcpy(staging, block, t.expert_bytes);
                ggml_backend_tensor_set_async(backend_, t.slots, staging, offset, t.expert_bytes);
                staging += t.expert_bytes;
            } else {
                ggml_backend_tensor_set(t.slots, block, offset, t.expert_bytes);
            }
        }
    }
    ggml_backend_synchronize(backend_);
}

}  // namespace rotary
