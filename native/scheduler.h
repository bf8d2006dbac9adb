// The scheduler's state, one per model: mapped GGUF files, routed-expert tensors, per-layer slot tables,
// and the two workers that compute one expert matmul's (token, expert) pairs: resident experts on the
// device from the slots, the rest on a CPU backend from llama.cpp's own (memory-mapped) weights. What the
// process registers once (devices, description) is in Process.
#pragma once

#include "ggml.h"
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
    uint64_t admissions = 0, evictions = 0, bytes_copied = 0;
    uint64_t slot_bytes = 0;              // one expert of every tensor of the layer
    std::vector<int32_t> routing;         // ids seen since the last take (when recording)
    std::vector<int32_t> replay;          // ids substituted for the router's (bench only)
    size_t replay_cursor = 0;
    uint64_t replay_call = 0;             // the graph_compute call that last substituted

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

// Copies admitted experts from the file mapping into their slots on a thread of its own, through pinned
// staging memory and the device's asynchronous copy on a backend (stream) of its own, so that the copies
// overlap the model's compute; wait() returns once every submitted copy has landed.
struct Scheduler;
class Copier {
  public:
    void start(const Scheduler * owner, ggml_backend_t backend, ggml_backend_buffer_type_t staging_type);
    void stop();
    void submit(const CopyJob & job);
    uint64_t wait();  // nanoseconds spent waiting
    size_t staging_bytes() const;

  private:
    void run();
    void copy(const std::vector<CopyJob> & jobs);
    std::thread thread_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::vector<CopyJob> queue_;
    bool busy_ = false, quit_ = false;
    const Scheduler * owner_ = nullptr;  // its layers, tensors and files
    ggml_backend_t backend_ = nullptr;
    ggml_backend_buffer_type_t staging_type_ = nullptr;
    ggml_backend_buffer_t staging_ = nullptr;
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

// Computes a subset of the pairs on one backend: gathers their input rows, runs the chain over a
// matrix stack (the model's or the slots), and scatters the output rows back.
class Worker {
  public:
    void init(ggml_backend_t backend);
    void release();
    bool launch(const Chain & chain, const Pairs & pairs);
    void finish(ggml_tensor * node, const Pairs & pairs);
    size_t scratch_bytes() const;
    ggml_backend_t backend = nullptr;

  private:
    ggml_gallocr_t galloc_ = nullptr;
    std::vector<uint8_t> meta_;
    ggml_context * ctx_ = nullptr;
    ggml_tensor * out_ = nullptr;
    std::vector<float> rows_;
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
    std::vector<CopyJob> pending;  // admitted, copying: enter the slot table at the next commit
    bool recording = false;
    uint64_t stall_ns = 0, commits = 0;
    int max_batch = 0;
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
    void set_threads(int n_threads);
    size_t device_bytes() const;
};

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
