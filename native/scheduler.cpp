// A model's scheduler state and the split expert matmul: pairs whose expert is resident run on the device
// from the slots, the others on the CPU from llama.cpp's weights; both write their rows into the node.
#include "scheduler.h"

#include <algorithm>
#include <cstring>

namespace rotary {

// Never destroyed: registered devices live until the process ends.
Process & process() {
    static Process * instance = new Process;
    return *instance;
}

bool is_routed_expert(const char * name) {
    return std::strncmp(name, "blk.", 4) == 0 && std::strstr(name, "_exps") != nullptr;
}

int layer_of(const char * name) {
    int layer = -1;
    return std::sscanf(name, "blk.%d.", &layer) == 1 ? layer : -1;
}

void Worker::init(ggml_backend_t b, ggml_backend_buffer_type_t staging_type, DeviceCounters * counters) {
    backend = b;
    staging_type_ = staging_type;
    counters_ = counters;
    if (!b) {
        return;
    }
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(b));
    meta_.resize(ggml_tensor_overhead() * 16 + ggml_graph_overhead_custom(16, false));
}

void Worker::release() {
    if (galloc_) {
        ggml_gallocr_free(galloc_);
    }
    galloc_ = nullptr;
    staging_.release();
}

size_t Worker::scratch_bytes() const {
    return galloc_ ? ggml_gallocr_get_buffer_size(galloc_, 0) : 0;
}

static size_t aligned(size_t bytes) {
    return (bytes + 255) & ~(size_t) 255;
}

// Gathers the pairs' input rows into staging memory and queues upload, compute and download on the
// backend's stream: no wait here, so the caller's host work overlaps the device's.
bool Worker::launch(const Chain & chain, const Pairs & pairs) {
    const ggml_tensor * src1 = chain.input;
    const int64_t k = src1->ne[0];
    const int64_t m = chain.out->ne[0];
    const int64_t n = (int64_t) pairs.size();
    const size_t in_bytes = k * n * sizeof(float), id_bytes = n * sizeof(int32_t), out_bytes = m * n * sizeof(float);
    out_offset_ = aligned(in_bytes) + aligned(id_bytes);
    // Grown to a power of two, so that decode never allocates again (a GPU's pinned allocation is slow).
    size_t want = 1 << 16;
    while (want < out_offset_ + out_bytes) {
        want *= 2;
    }
    if (!staging_.ensure(want, staging_type_, counters_)) {
        return false;
    }
    float * rows = (float *) staging_.data;
    for (int64_t p = 0; p < n; p++) {
        const char * row = (const char *) src1->data + (pairs.slot[p] % src1->ne[1]) * src1->nb[1]
                           + pairs.token[p] * src1->nb[2];
        std::memcpy(&rows[p * k], row, k * sizeof(float));
    }
    std::memcpy(staging_.data + aligned(in_bytes), pairs.id.data(), id_bytes);
    ggml_init_params params = { meta_.size(), meta_.data(), true };
    ctx_ = ggml_init(params);
    ggml_tensor * input = ggml_new_tensor_3d(ctx_, GGML_TYPE_F32, k, 1, n);
    ggml_tensor * ids = ggml_new_tensor_2d(ctx_, GGML_TYPE_I32, 1, n);
    ggml_set_input(input);
    ggml_set_input(ids);
    ggml_tensor * x = input;
    if (chain.glu) {
        ggml_tensor * a = ggml_mul_mat_id(ctx_, chain.w_glu0, input, ids);
        ggml_tensor * b = ggml_mul_mat_id(ctx_, chain.w_glu1, input, ids);
        x = ggml_glu_split(ctx_, a, b, (ggml_glu_op) chain.glu->op_params[0]);
        std::memcpy(x->op_params, chain.glu->op_params, sizeof(x->op_params));  // swapped, alpha, limit
    }
    out_ = ggml_mul_mat_id(ctx_, chain.w_out, x, ids);
    ggml_set_output(out_);
    ggml_cgraph * graph = ggml_new_graph_custom(ctx_, 16, false);
    ggml_build_forward_expand(graph, out_);
    // A type the device cannot multiply, or repacked weights whose kernels refuse this shape.
    bool supported = ggml_backend_supports_op(backend, out_);
    for (int i = 0; i < ggml_graph_n_nodes(graph); i++) {
        supported = supported && ggml_backend_supports_op(backend, ggml_graph_node(graph, i));
    }
    if (!supported || !ggml_gallocr_alloc_graph(galloc_, graph)) {
        ggml_free(ctx_);
        ctx_ = nullptr;
        return false;
    }
    if (counters_) {
        counters_->transfer(in_bytes);
        counters_->transfer(id_bytes);
    }
    ggml_backend_tensor_set_async(backend, input, staging_.data, 0, in_bytes);
    ggml_backend_tensor_set_async(backend, ids, staging_.data + aligned(in_bytes), 0, id_bytes);
    if (ggml_backend_graph_compute_async(backend, graph) != GGML_STATUS_SUCCESS) {
        return false;
    }
    if (counters_) {
        counters_->transfer(out_bytes);
    }
    ggml_backend_tensor_get_async(backend, out_, staging_.data + out_offset_, 0, out_bytes);
    return true;
}

// The one wait of the worker's part of a block, then the rows into the node.
void Worker::finish(ggml_tensor * node, const Pairs & pairs) {
    if (counters_) {
        counters_->sync(backend);
    } else {
        ggml_backend_synchronize(backend);
    }
    const int64_t m = node->ne[0];
    const int64_t n = (int64_t) pairs.size();
    const float * rows = (const float *) (staging_.data + out_offset_);
    for (int64_t p = 0; p < n; p++) {
        char * row = (char *) node->data + pairs.slot[p] * node->nb[1] + pairs.token[p] * node->nb[2];
        std::memcpy(row, &rows[p * m], m * sizeof(float));
    }
    ggml_free(ctx_);
    ctx_ = nullptr;
}

void Layer::free_slots() {
    ggml_backend_buffer_free(buffer);
    if (ctx) {
        ggml_free(ctx);
    }
    buffer = nullptr;
    ctx = nullptr;
    slot_of_expert.assign(n_expert, -1);
    expert_in_slot.clear();
    n_resident = 0;
}

Layer * Scheduler::find_layer(int layer) {
    auto found = layers.find(layer);
    if (found == layers.end()) {
        set_error("layer " + std::to_string(layer) + " has no configured expert tensors");
        return nullptr;
    }
    return &found->second;
}

bool Scheduler::start() {
    const Process & p = process();
    if (!p.registered) {
        set_error("the scheduler is not registered");
        return false;
    }
    host.init(ggml_backend_dev_init(p.cpu_dev, nullptr), nullptr, nullptr);
    device.init(ggml_backend_dev_init(p.slot_dev, nullptr), staging_type(), &traffic);
    copy_backend = p.gpu ? ggml_backend_dev_init(p.slot_dev, nullptr) : device.backend;  // a stream of its own
    if (!host.backend || !device.backend || !copy_backend) {
        const ggml_backend_dev_t failed = host.backend ? p.slot_dev : p.cpu_dev;
        set_error(std::string("cannot start a backend on ") + ggml_backend_dev_name(failed));
        return false;
    }
    copier.start(copy_backend, &traffic);
    return true;
}

Scheduler::~Scheduler() {
    commit();
    copier.stop();
    for (auto & entry : layers) {
        entry.second.free_slots();
    }
    for (auto & file : files) {
        unmap_file(file);
    }
    host.release();
    device.release();
    if (copy_backend && copy_backend != device.backend) {
        ggml_backend_free(copy_backend);
    }
    for (ggml_backend_t backend : { host.backend, device.backend }) {
        if (backend) {
            ggml_backend_free(backend);
        }
    }
}

// The index of our tensor that llama.cpp's weight `w` is, or -1: matched by name, type and shape, and by
// content (the first bytes of the first and last expert), so a weight of another model that happens to
// share names is never mistaken for ours. Cached per weight.
int Scheduler::bind(const ggml_tensor * w) {
    auto cached = bound.find(w);
    if (cached != bound.end()) {
        return cached->second;
    }
    int result = -1;
    auto named = tensor_by_name.find(w->name);
    if (named != tensor_by_name.end() && w->data && w->buffer) {
        const ExpertTensor & t = tensors[named->second];
        const uint8_t * file = files[t.file].base + t.offset;
        const uint64_t last = (t.n_expert - 1) * t.expert_bytes;
        const size_t n = (size_t) std::min<uint64_t>(t.expert_bytes, 4096);
        const bool same_shape = w->type == t.type && w->ne[0] == t.ne0 && w->ne[1] == t.ne1
                                && w->ne[2] == t.n_expert && w->nb[2] == t.expert_bytes && ggml_is_contiguous(w);
        // A repacked copy (not host layout) cannot be compared with the file: name and shape must do.
        const bool same_bytes = !ggml_backend_buffer_is_host(w->buffer)
                                || (std::memcmp(w->data, file, n) == 0
                                    && std::memcmp((const uint8_t *) w->data + last, file + last, n) == 0);
        if (same_shape && same_bytes) {
            result = named->second;
        }
    }
    bound[w] = result;
    return result;
}

// Counts the layer's routing (once per MoE block: at its down projection) and its device/host split.
void Scheduler::count(const ggml_tensor * ids, Layer & layer) {
    for (int64_t t = 0; t < ids->ne[1]; t++) {
        for (int64_t s = 0; s < ids->ne[0]; s++) {
            const int32_t e = id_at(ids, t, s);
            if (e < 0 || e >= layer.n_expert) {
                continue;
            }
            layer.counts[e]++;
            if (recording) {
                layer.routing.push_back(e);
            }
            if (layer.slot_of_expert[e] >= 0) {
                layer.device_pairs++;
            } else {
                layer.host_pairs++;
            }
        }
    }
}

ggml_tensor * Scheduler::slots_of(const ggml_tensor * node) {
    return tensors[bind(node->src[0])].slots;
}

// Divides the pairs of one MoE block between the device (resident experts, through the slots) and the
// host (the model's matrices), runs both chains at once and writes the output rows. Returns false when
// the host worker refuses its part (the caller then computes the nodes on the host as they are).
bool Scheduler::compute_pairs(const Chain & on_device_chain, const Chain & on_host_chain, const ggml_tensor * ids,
                              const Layer & layer) {
    Pairs on_device, on_host;
    for (int64_t tok = 0; tok < ids->ne[1]; tok++) {
        for (int64_t s = 0; s < ids->ne[0]; s++) {
            const int32_t e = id_at(ids, tok, s);
            const int32_t slot = (e >= 0 && e < layer.n_expert) ? layer.slot_of_expert[e] : -1;
            if (slot >= 0) {
                on_device.add((int32_t) s, (int32_t) tok, slot);
            } else {
                on_host.add((int32_t) s, (int32_t) tok, e);
            }
        }
    }
    split_matmuls++;
    const bool device_running = on_device.size() && device.launch(on_device_chain, on_device);
    if (on_device.size() && !device_running) {
        for (size_t p = 0; p < on_device.size(); p++) {  // the device refused: its pairs go to the host
            on_host.add(on_device.slot[p], on_device.token[p], layer.expert_in_slot[on_device.id[p]]);
        }
    }
    const bool host_done = !on_host.size() || host.launch(on_host_chain, on_host);
    if (on_host.size() && host_done) {
        host.finish(on_host_chain.out, on_host);
    }
    if (device_running) {
        device.finish(on_device_chain.out, on_device);
    }
    return host_done;
}

// Bench only: the next ids of the layer's replayed trace replace the router's choice (written into the
// split's own copy of the ids, so every expert node of the block sees them).
void Scheduler::replay(ggml_tensor * ids, Layer & layer) {
    for (int64_t t = 0; t < ids->ne[1]; t++) {
        for (int64_t s = 0; s < ids->ne[0]; s++) {
            id_at(ids, t, s) = layer.replay[layer.replay_cursor];
            layer.replay_cursor = (layer.replay_cursor + 1) % layer.replay.size();
        }
    }
    layer.replay_call = compute_serial;
}

ggml_backend_buffer_type_t Scheduler::staging_type() const {
    const Process & p = process();
    return p.gpu ? ggml_backend_dev_host_buffer_type(p.slot_dev) : nullptr;
}

// One expert's blocks of every tensor of the layer, from the file into the slot (landed at the next drain).
void Scheduler::copy_expert(const Layer & layer, int32_t expert, int32_t slot, bool urgent) {
    for (int i : layer.tensors) {
        const ExpertTensor & t = tensors[i];
        const uint8_t * block = files[t.file].base + t.offset + (uint64_t) expert * t.expert_bytes;
        copier.submit(t.slots, block, (size_t) slot * t.expert_bytes, t.expert_bytes, urgent);
    }
}

static void enter(Layer & layer, const CopyJob & job) {
    layer.slot_of_expert[job.expert] = job.slot;
    layer.expert_in_slot[job.slot] = job.expert;
    layer.n_resident++;
}

void Scheduler::land_prefetched() {
    if (prefetching.empty()) {
        return;
    }
    prefetch_stall_ns += copier.drain_urgent();
    for (const CopyJob & job : prefetching) {
        enter(layers.at(job.layer), job);
    }
    prefetching.clear();
}

// Wait for the admitted experts' copies and put them in the slot tables.
void Scheduler::commit() {
    bool stalled = false;
    const uint64_t waited = copier.drain(&stalled);
    stall_ns += pending.empty() ? 0 : waited;
    stalls += stalled && !pending.empty() ? 1 : 0;
    for (const CopyJob & job : pending) {
        enter(layers.at(job.layer), job);
    }
    for (const CopyJob & job : prefetching) {
        enter(layers.at(job.layer), job);
    }
    commits += pending.empty() ? 0 : 1;
    pending.clear();
    prefetching.clear();
}

// The context's thread count (llama.cpp sets it before every ubatch) for this state's CPU backends.
void Scheduler::set_threads(int n_threads) {
    const Process & p = process();
    p.set_cpu_threads(host.backend, n_threads);
    if (!p.gpu) {
        p.set_cpu_threads(device.backend, n_threads);
    }
}

size_t Scheduler::device_bytes() const {
    size_t total = device.scratch_bytes();
    for (const auto & entry : layers) {
        total += entry.second.buffer ? ggml_backend_buffer_get_size(entry.second.buffer) : 0;
    }
    return total;
}

}  // namespace rotary
