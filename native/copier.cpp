// Background copies of admitted experts into their device slots (expert rotation), and the staging memory
// it and the workers share the rules of. The copier's thread touches host memory only: llama.cpp may be
// capturing a CUDA graph on the compute thread, and another thread's CUDA calls during a capture are a
// known intermittent failure upstream; so the compute thread issues every device copy (pump, drain).
#include "scheduler.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace rotary {

static uint64_t now_ns() {
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

bool HostBuffer::ensure(size_t bytes, ggml_backend_buffer_type_t type, DeviceCounters * counters) {
    if (bytes <= size) {
        return true;
    }
    release();
    if (counters) {
        counters->call();
        counters->host_allocs++;
    }
    if (type) {
        buffer = ggml_backend_buft_alloc_buffer(type, bytes);
        if (!buffer) {
            return false;
        }
        data = (uint8_t *) ggml_backend_buffer_get_base(buffer);
    } else {
        plain.resize(bytes);
        data = plain.data();
    }
    size = bytes;
    return true;
}

void HostBuffer::release() {
    if (buffer) {
        ggml_backend_buffer_free(buffer);
    }
    buffer = nullptr;
    plain.clear();
    plain.shrink_to_fit();
    data = nullptr;
    size = 0;
}

void Copier::start(ggml_backend_t backend, DeviceCounters * counters) {
    backend_ = backend;
    counters_ = counters;
    chunk_.assign(kChunks, Chunk{});
    thread_ = std::thread(&Copier::run, this);
    counters_->copier_thread = thread_.get_id();
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
    ring_.release();
}

bool Copier::reserve(ggml_backend_buffer_type_t staging_type) {
    std::lock_guard<std::mutex> lock(mutex_);
    return ring_.ensure(kChunkBytes * kChunks, staging_type, counters_);
}

void Copier::submit(ggml_tensor * slots, const uint8_t * source, size_t offset, size_t bytes, bool urgent) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<Task> tasks;
        for (size_t done = 0; done < bytes; done += kChunkBytes) {
            tasks.push_back({ slots, source + done, offset + done, std::min(kChunkBytes, bytes - done), urgent });
        }
        // Urgent tasks go behind the urgent ones still waiting, ahead of every other task not yet started.
        const size_t at = urgent ? next_task_ + urgent_queued_ : queue_.size();
        queue_.insert(queue_.begin() + at, tasks.begin(), tasks.end());
        urgent_queued_ += urgent ? tasks.size() : 0;
    }
    wake_.notify_all();
}

// The thread: takes the next task once a chunk is free and copies its bytes from the mapping into it.
void Copier::run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
        int free_chunk = -1;
        wake_.wait(lock, [&] {
            free_chunk = -1;
            for (int c = 0; c < kChunks && free_chunk < 0; c++) {
                free_chunk = chunk_[c].state == kFree ? c : -1;
            }
            return quit_ || (next_task_ < queue_.size() && free_chunk >= 0 && ring_.data);
        });
        if (quit_) {
            return;
        }
        const Task task = queue_[next_task_++];
        urgent_queued_ -= task.urgent ? 1 : 0;
        filling_ = true;
        filling_urgent_ = task.urgent;
        lock.unlock();
        const uint64_t started = now_ns();
        std::memcpy(ring_.data + (size_t) free_chunk * kChunkBytes, task.source, task.bytes);
        copy_ns_ += now_ns() - started;
        copy_bytes_ += task.bytes;
        chunks_++;
        lock.lock();
        chunk_[free_chunk] = { kFilled, task.slots, task.offset, task.bytes, task.urgent };
        filling_ = filling_urgent_ = false;
        if (next_task_ == queue_.size()) {
            queue_.clear();
            next_task_ = 0;
        }
        filled_.notify_all();
    }
}

// Compute thread only. Issues the filled chunks' copies to their slots on the copy stream; with
// wait_landed, or when no chunk is left free for the thread, waits for the issued ones and frees them.
void Copier::pump(bool wait_landed) {
    std::vector<int> filled, issued;
    bool starving = true;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (int c = 0; c < kChunks; c++) {
            filled.push_back(chunk_[c].state == kFilled ? c : -1);
            issued.push_back(chunk_[c].state == kIssued ? c : -1);
            starving = starving && chunk_[c].state != kFree;
        }
    }
    bool any_issued = false;
    for (int c : filled) {
        if (c < 0) {
            continue;
        }
        const Chunk & chunk = chunk_[c];  // only this thread reads a filled chunk
        counters_->transfer(chunk.bytes);
        ggml_backend_tensor_set_async(backend_, chunk.slots, ring_.data + (size_t) c * kChunkBytes, chunk.offset,
                                      chunk.bytes);
        any_issued = true;
    }
    for (int c : issued) {
        any_issued = any_issued || c >= 0;
    }
    const bool wait = any_issued && (wait_landed || starving);
    if (wait) {
        counters_->sync(backend_);
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (int c = 0; c < kChunks; c++) {
            const bool was_filled = filled[c] >= 0;
            if (wait && (was_filled || issued[c] >= 0)) {
                chunk_[c].state = kFree;
                chunk_[c].urgent = false;
            } else if (was_filled) {
                chunk_[c].state = kIssued;
            }
        }
    }
    if (wait) {
        wake_.notify_all();
    }
}

uint64_t Copier::drain(bool * stalled) {
    const uint64_t started = now_ns();
    *stalled = false;
    while (true) {
        pump(true);
        std::unique_lock<std::mutex> lock(mutex_);
        bool idle = !filling_ && next_task_ >= queue_.size();
        for (const Chunk & chunk : chunk_) {
            idle = idle && chunk.state == kFree;
        }
        if (idle) {
            break;
        }
        *stalled = true;  // the thread has not filled everything yet
        filled_.wait(lock, [this] {
            for (const Chunk & chunk : chunk_) {
                if (chunk.state == kFilled) {
                    return true;
                }
            }
            return !filling_ && next_task_ >= queue_.size();
        });
    }
    return now_ns() - started;
}

bool Copier::urgent_left() const {
    if (filling_urgent_ || urgent_queued_) {
        return true;
    }
    for (const Chunk & chunk : chunk_) {
        if (chunk.urgent && chunk.state != kFree) {
            return true;
        }
    }
    return false;
}

// Like drain, for the urgent tasks only (the other chunks already filled land with them).
uint64_t Copier::drain_urgent() {
    const uint64_t started = now_ns();
    while (true) {
        pump(true);
        std::unique_lock<std::mutex> lock(mutex_);
        if (!urgent_left()) {
            break;
        }
        filled_.wait(lock, [this] {
            for (const Chunk & chunk : chunk_) {
                if (chunk.state == kFilled && chunk.urgent) {
                    return true;
                }
            }
            return !filling_urgent_ && !urgent_queued_;
        });
    }
    return now_ns() - started;
}

}  // namespace rotary
