// The scheduler's state, one per model: mapped GGUF files, routed-expert tensors, per-layer slot tables,
// and the two workers that compute one expert matmul's (token, expert) pairs: resident experts on the
// device from the slots, the rest on a CPU backend from llama.cpp's own (memory-mapped) weights. What the
// process registers once (devices, description) is in Process.
#pragma once

#include "ggml.h"
#include "rotary_sched.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

namespace rotary {

struct MappedFile {
    std::string path;
    const uint8_t * base = nullptr;
    size_t size = 0;
};

// One routed-expert tensor of the model (gate, up, down or fused gate_up of one layer).
struct ExpertTensor {
    std::string name;
    int layer = -1;
    int file = -1;
    uint64_t offset = 0;        // absolute file offset of expert 0
    uint64_t expert_bytes = 0;  // one expert's block (nb[2])
    int n_expert = 0;
    ggml_type type = GGML_TYPE_F32;
    int64_t ne0 = 0, ne1 = 0;
    bool counts_routing = false;    // the down projection: routing is counted there, once per MoE block
    ggml_tensor * slots = nullptr;  // [ne0, ne1, n_slots] in the device's memory
};

// A layer's router (ffn_gate_inp and what the architecture adds to it), kept to predict the layer's experts
// from the previous MoE layer's input (cross-layer prefetch; predict.cpp).
struct Router {
    int64_t n_embd = 0;
    int n_expert = 0, n_used = 0;
    int gating = 0;                 // ROTARY_GATING_*
    std::vector<uint16_t> weight;   // [n_expert][n_embd], bfloat16 (to_bf16)
    std::vector<float> logit_bias;  // [n_expert] or empty
    std::vector<float> select_bias; // [n_expert] or empty (exp_probs_b: added to the gated scores)
    std::vector<float> input_scale; // [n_embd] or empty
    bool configured() const { return !weight.empty(); }
    // The n_used experts the router would select for input x, best first.
    void predict(const float * x, int32_t * out, std::vector<float> & scratch) const;
};

struct Layer {
    int n_expert = 0;
    std::vector<int> tensors;             // indices into Scheduler::tensors
    std::vector<int32_t> slot_of_expert;  // -1: not resident
    std::vector<int32_t> expert_in_slot;  // -1: empty slot
    int n_resident = 0;
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    std::vector<uint64_t> counts;         // selections per expert
    uint64_t device_pairs = 0, host_pairs = 0;
    uint64_t admissions = 0, evictions = 0, bytes_copied = 0, prefetches = 0;
    uint64_t slot_bytes = 0;              // one expert of every tensor of the layer
    std::vector<int32_t> routing;         // ids seen since the last take (when recording)
    std::vector<int32_t> replay;          // ids substituted for the router's (bench only)
    size_t replay_cursor = 0;
    uint64_t replay_call = 0;             // the graph_compute call that last substituted
    Router router;
    std::vector<int32_t> predicted;       // predictions of this layer's experts since the last take (recording)
    uint64_t predict_call = 0;            // the graph_compute call that last predicted the next layer

    void free_slots();  // the slot buffer and its tensors; every expert back to the host
};

// Expert id of selection `slot` of token `token` in a MUL_MAT_ID's ids tensor (I32, strided).
inline int32_t & id_at(const ggml_tensor * ids, int64_t token, int64_t slot) {
    return *(int32_t *) ((char *) ids->data + token * ids->nb[1] + slot * ids->nb[0]);
}

// One expert block to bring into a slot, in the background.
struct CopyJob {
    int layer;
    int32_t expert;
    int32_t slot;
};

// What the plugin counts of its own device traffic (rotary_sched_stats_t), and the thread it expects every
// device call on: the thread that calls graph_compute, commit and the residency functions.
struct DeviceCounters {
    uint64_t syncs = 0;            // blocking waits on a device stream (synchronize, blocking set/get)
    uint64_t transfers = 0;        // host <-> device copies issued (activations, ids, outputs, slot chunks)
    uint64_t transfer_bytes = 0;
    uint64_t off_thread_calls = 0; // device calls made on the copier's thread (must stay 0)
    uint64_t host_allocs = 0;      // staging buffers allocated (pinned on a GPU)
    std::thread::id copier_thread;

    void call() {
        if (std::this_thread::get_id() == copier_thread) {
            off_thread_calls++;
        }
    }
    void sync(ggml_backend_t backend) {
        call();
        syncs++;
        ggml_backend_synchronize(backend);
    }
    void transfer(size_t bytes) {
        call();
        transfers++;
        transfer_bytes += bytes;
    }
};

// Host memory for a worker or the copier: pinned (the device's host buffer type) on a GPU, plain on the
// stand-in. Grows only when a larger size is asked for; allocated on the compute thread.
struct HostBuffer {
    ggml_backend_buffer_t buffer = nullptr;
    std::vector<uint8_t> plain;
    uint8_t * data = nullptr;
    size_t size = 0;
    bool ensure(size_t bytes, ggml_backend_buffer_type_t type, DeviceCounters * counters);
    void release();
};

// Copies admitted experts from the file mapping into their slots, in chunks of at most kChunkBytes through
// a ring of staging chunks allocated once (reserve, at slot set-up). Its thread only copies mmap -> staging;
// every device call (the chunk's asynchronous copy to the slot, the wait for it) is made by pump() and
// drain() on the compute thread, at defined points: inside the plugin's graph_compute and between decodes.
struct Scheduler;
class Copier {
  public:
    static constexpr size_t kChunkBytes = 256 * 1024;
    static constexpr int kChunks = 16;

    void start(ggml_backend_t backend, DeviceCounters * counters);
    void stop();
    bool reserve(ggml_backend_buffer_type_t staging_type);  // the ring, once (compute thread)
    // urgent: ahead of every task not yet started (a prefetch, needed within this token)
    void submit(ggml_tensor * slots, const uint8_t * source, size_t offset, size_t bytes, bool urgent = false);
    void pump(bool wait_landed);  // compute thread: issue filled chunks; wait_landed: and wait for them
    uint64_t drain(bool * stalled);  // compute thread: until every submitted byte has landed; ns spent
    uint64_t drain_urgent();      // compute thread: until every urgent byte has landed; ns spent
    size_t staging_bytes() const { return ring_.size; }
    uint64_t copy_ns() const { return copy_ns_; }
    uint64_t copy_bytes() const { return copy_bytes_; }
    uint64_t chunks() const { return chunks_; }
    void reset_stats() { copy_ns_ = copy_bytes_ = chunks_ = 0; }

  private:
    enum State { kFree, kFilled, kIssued };
    struct Task {
        ggml_tensor * slots;
        const uint8_t * source;
        size_t offset, bytes;
        bool urgent;
    };
    struct Chunk {
        State state = kFree;
        ggml_tensor * slots = nullptr;
        size_t offset = 0, bytes = 0;
        bool urgent = false;
    };
    void run();
    bool urgent_left() const;  // under the mutex
    std::thread thread_;
    std::mutex mutex_;
    std::condition_variable wake_, filled_;
    std::vector<Task> queue_;
    size_t next_task_ = 0, urgent_queued_ = 0;  // urgent tasks not yet started sit first from next_task_
    bool filling_ = false, filling_urgent_ = false, quit_ = false;
    std::vector<Chunk> chunk_;
    HostBuffer ring_;
    ggml_backend_t backend_ = nullptr;
    DeviceCounters * counters_ = nullptr;
    std::atomic<uint64_t> copy_ns_{ 0 }, copy_bytes_{ 0 }, chunks_{ 0 };
};

// (token, expert) pairs of one MUL_MAT_ID: row `slot` of token `token`, computed with matrix `id`.
struct Pairs {
    std::vector<int32_t> slot, token, id;
    void clear() { slot.clear(); token.clear(); id.clear(); }
    void add(int32_t s, int32_t t, int32_t i) { slot.push_back(s); token.push_back(t); id.push_back(i); }
    size_t size() const { return id.size(); }
};

// What one worker runs over gathered (token, expert) pairs: one expert matmul, or a whole expert FFN -
// two matmuls on the same input (gate and up), the activation node between them, and the down matmul -
// so that a device keeps the intermediates and sees one upload and one download per MoE block.
struct Chain {
    ggml_tensor * out = nullptr;          // the MUL_MAT_ID node whose rows are produced (down)
    const ggml_tensor * input = nullptr;  // where the pairs' input rows come from
    ggml_tensor * w_out = nullptr;        // matrices for `out` (the model's, or the slots)
    const ggml_tensor * glu = nullptr;    // the activation node to reproduce (chained only)
    ggml_tensor * w_glu0 = nullptr;       // matrices of the matmul feeding glu->src[0]
    ggml_tensor * w_glu1 = nullptr;       // ... and glu->src[1]
};

// Computes a subset of the pairs on one backend: gathers their input rows into its staging memory, queues
// the upload, the chain over a matrix stack (the model's or the slots) and the download on the backend's
// stream (launch), and after one synchronization scatters the output rows back (finish).
class Worker {
  public:
    void init(ggml_backend_t backend, ggml_backend_buffer_type_t staging_type, DeviceCounters * counters);
    void release();
    bool launch(const Chain & chain, const Pairs & pairs);
    void finish(ggml_tensor * node, const Pairs & pairs);
    size_t scratch_bytes() const;
    size_t staging_bytes() const { return staging_.size; }
    ggml_backend_t backend = nullptr;

  private:
    ggml_gallocr_t galloc_ = nullptr;
    std::vector<uint8_t> meta_;
    ggml_context * ctx_ = nullptr;
    ggml_tensor * out_ = nullptr;
    HostBuffer staging_;  // input rows, ids, output rows
    size_t out_offset_ = 0;
    ggml_backend_buffer_type_t staging_type_ = nullptr;
    DeviceCounters * counters_ = nullptr;  // nullptr: the host worker (no device traffic)
};

// Set once by rotary_sched_register, shared by every model's state.
struct Process {
    bool registered = false;
    bool gpu = false;
    std::string description;
    ggml_backend_dev_t cpu_dev = nullptr, slot_dev = nullptr;
    void (*set_cpu_threads)(ggml_backend_t, int) = nullptr;
};

Process & process();

// One model's state. Held by its Python handle and by every llama context (backend) that took it; the
// last of them to let go destroys it (its copier thread, backends, slots and mappings with it).
struct Scheduler {
    Worker device, host;
    ggml_backend_t copy_backend = nullptr;  // the device's second stream (the device worker's own on a CPU)
    Copier copier;
    DeviceCounters traffic;
    std::vector<CopyJob> pending;  // admitted, copying: enter the slot table at the next commit
    std::vector<CopyJob> prefetching;  // predicted, copying: enter the table before their layer computes
    uint64_t prefetch_stall_ns = 0;    // time layers waited for their prefetched experts
    rotary_decide * decide = nullptr;  // the decisions bound to this state (prefetch during a token)
    std::vector<float> predict_scratch;
    std::vector<int32_t> prediction;
    bool recording = false, recording_predictions = false;
    uint64_t stall_ns = 0, commits = 0, stalls = 0;
    uint64_t prompt_selections = 0;
    uint64_t resident_bytes = 0;     // copied by set_resident (slots whose expert changed)  // counted by the eval callback, for batches the plugin does not claim
    int max_batch = 0;
    ggml_backend_buffer_type_t boundary = nullptr;  // what a context's device reports (set when one is made)
    std::atomic<int> contexts{ 0 };  // backends holding the state

    std::vector<MappedFile> files;
    std::vector<ExpertTensor> tensors;
    std::unordered_map<std::string, int> tensor_by_name;
    std::map<int, Layer> layers;
    std::unordered_map<const ggml_tensor *, int> bound;  // llama.cpp weight -> tensors index, -1: foreign
    uint64_t graph_calls = 0, split_matmuls = 0;
    uint64_t compute_serial = 0;  // graph_compute calls ever (never reset: marks replay substitutions)

    Scheduler() = default;
    Scheduler(const Scheduler &) = delete;
    Scheduler & operator=(const Scheduler &) = delete;
    ~Scheduler();
    bool start();  // the workers' backends and the copier; false with the error set
    bool configured() const { return !tensors.empty(); }
    Layer * find_layer(int layer);  // nullptr, with the error set, when the layer has no configured tensors
    int bind(const ggml_tensor * weights);
    bool compute_pairs(const Chain & on_device, const Chain & on_host, const ggml_tensor * ids, const Layer & layer);
    ggml_tensor * slots_of(const ggml_tensor * node);
    void count(const ggml_tensor * ids, Layer & layer);
    void replay(ggml_tensor * ids, Layer & layer);
    void commit();
    void land_prefetched();  // wait for the prefetches' copies and put them in the slot tables
    void predict_next(int layer, const ggml_tensor * input, const ggml_tensor * ids);
    void copy_expert(const Layer & layer, int32_t expert, int32_t slot, bool urgent = false);  // through the copier
    ggml_backend_buffer_type_t staging_type() const;  // pinned host memory on a GPU, nullptr on the stand-in
    void set_threads(int n_threads);
    size_t device_bytes() const;
};

// decide.cpp: whether the bound decisions take predictions now (prefetch on, a request decoding).
bool decide_prefetching(const rotary_decide * d);

uint16_t to_bf16(float value);  // predict.cpp

bool map_file(const std::string & path, MappedFile & file);
void unmap_file(MappedFile & file);
void set_error(const std::string & message);
bool is_routed_expert(const char * name);
int layer_of(const char * name);

}  // namespace rotary

// The handle Python holds (rotary_sched.h).
struct rotary_sched_model {
    std::shared_ptr<rotary::Scheduler> state;
};
