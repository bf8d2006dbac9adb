// The C API (rotary_sched.h) of one model's state: configuration, slots, residency and statistics.
#include "rotary_sched.h"
#include "scheduler.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace rotary {

static std::string last_error;

void set_error(const std::string & message) {
    last_error = message;
}

static int fail(const std::string & message) {
    set_error(message);
    return -1;
}

bool map_file(const std::string & path, MappedFile & file) {
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) {
        return fail(path + ": " + std::strerror(errno)) == 0;
    }
    struct stat st = {};
    void * base = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        base = mmap(nullptr, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    }
    const int err = errno;
    close(fd);
    if (base == MAP_FAILED) {
        return fail(path + ": cannot map the file: " + std::strerror(err)) == 0;
    }
    file = { path, (const uint8_t *) base, (size_t) st.st_size };
    return true;
}

void unmap_file(MappedFile & file) {
    if (file.base) {
        munmap((void *) file.base, file.size);
    }
    file.base = nullptr;
}

}  // namespace rotary

using namespace rotary;

const char * rotary_sched_last_error(void) {
    return last_error.c_str();
}

int rotary_sched_add_file(rotary_sched_model * model, const char * path) {
    Scheduler & s = *model->state;
    MappedFile file;
    if (!map_file(path, file)) {
        return -1;
    }
    s.files.push_back(file);
    return (int) s.files.size() - 1;
}

int rotary_sched_add_tensor(rotary_sched_model * model, const char * name, int file, uint64_t offset,
                            uint64_t expert_bytes, int n_expert, int type, int64_t ne0, int64_t ne1) {
    Scheduler & s = *model->state;
    const int layer = layer_of(name);
    if (layer < 0 || !is_routed_expert(name)) {
        return fail(std::string(name) + ": not a routed-expert tensor name (blk.N.ffn_*_exps.*)");
    }
    if (file < 0 || file >= (int) s.files.size()) {
        return fail(std::string(name) + ": unknown file index " + std::to_string(file));
    }
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) <= 0 || ne0 <= 0 || ne1 <= 0
        || n_expert <= 0 || ggml_row_size((ggml_type) type, ne0) * ne1 != expert_bytes) {
        return fail(std::string(name) + ": type " + std::to_string(type) + " and shape " + std::to_string(ne0) + "x"
                    + std::to_string(ne1) + " do not make " + std::to_string(expert_bytes) + " bytes per expert");
    }
    if (offset + expert_bytes * (uint64_t) n_expert > s.files[file].size) {
        return fail(std::string(name) + ": experts end past the end of " + s.files[file].path);
    }
    Layer & l = s.layers[layer];
    if (l.n_expert && l.n_expert != n_expert) {
        return fail(std::string(name) + ": " + std::to_string(n_expert) + " experts, other tensors of layer "
                    + std::to_string(layer) + " have " + std::to_string(l.n_expert));
    }
    l.slot_bytes += expert_bytes;
    if (!l.n_expert) {
        l.n_expert = n_expert;
        l.counts.assign(n_expert, 0);
        l.slot_of_expert.assign(n_expert, -1);
    }
    ExpertTensor t;
    t.name = name;
    t.layer = layer;
    t.file = file;
    t.offset = offset;
    t.expert_bytes = expert_bytes;
    t.n_expert = n_expert;
    t.type = (ggml_type) type;
    t.ne0 = ne0;
    t.ne1 = ne1;
    t.counts_routing = std::strstr(name, "ffn_down_") != nullptr && std::strstr(name, ".weight") != nullptr;
    s.tensor_by_name[t.name] = (int) s.tensors.size();
    l.tensors.push_back((int) s.tensors.size());
    s.tensors.push_back(t);
    return (int) s.tensors.size() - 1;
}

int rotary_sched_set_slots(rotary_sched_model * model, int layer, int n_slots) {
    Scheduler & s = *model->state;
    Layer * found = s.find_layer(layer);
    if (!found) {
        return -1;
    }
    s.commit();
    Layer & l = *found;
    l.free_slots();
    if (n_slots <= 0) {
        return 0;
    }
    n_slots = std::min(n_slots, l.n_expert);
    ggml_init_params params = { ggml_tensor_overhead() * l.tensors.size(), nullptr, true };
    l.ctx = ggml_init(params);
    for (int i : l.tensors) {
        ExpertTensor & t = s.tensors[i];
        t.slots = ggml_new_tensor_3d(l.ctx, t.type, t.ne0, t.ne1, n_slots);
        ggml_format_name(t.slots, "%s.slots", t.name.c_str());
    }
    l.buffer = ggml_backend_alloc_ctx_tensors_from_buft(l.ctx, ggml_backend_dev_buffer_type(process().slot_dev));
    if (!l.buffer) {
        l.free_slots();
        return fail("cannot allocate " + std::to_string(n_slots) + " expert slots of layer " + std::to_string(layer)
                    + " on " + ggml_backend_dev_name(process().slot_dev));
    }
    // Never-filled slots are read: CUDA's MMQ kernels read past an expert's end (llama.cpp pads copied
    // experts for that reason, ggml-backend.cpp ggml_backend_sched_compute_splits), so no garbage there.
    s.traffic.call();
    ggml_backend_buffer_clear(l.buffer, 0);
    // The copier's staging ring, once, here on the compute thread (pinned memory on a GPU).
    if (!s.copier.reserve(s.staging_type())) {
        l.free_slots();
        return fail("cannot allocate the copier's staging memory");
    }
    l.expert_in_slot.assign(n_slots, -1);
    return n_slots;
}

int rotary_sched_set_resident(rotary_sched_model * model, int layer, const int32_t * experts, int n_experts) {
    Scheduler & s = *model->state;
    Layer * found = s.find_layer(layer);
    if (!found) {
        return -1;
    }
    s.commit();
    Layer & l = *found;
    if (n_experts < 0 || n_experts > (int) l.expert_in_slot.size()) {
        return fail("layer " + std::to_string(layer) + ": " + std::to_string(n_experts) + " experts for "
                    + std::to_string(l.expert_in_slot.size()) + " slots");
    }
    std::set<int32_t> seen;
    for (int k = 0; k < n_experts; k++) {
        if (experts[k] < 0 || experts[k] >= l.n_expert || !seen.insert(experts[k]).second) {
            return fail("layer " + std::to_string(layer) + ": expert " + std::to_string(experts[k])
                        + " is out of range or repeated");
        }
    }
    // Only slots whose expert changes are copied (a survivor in the same slot stays), through the copier.
    l.slot_of_expert.assign(l.n_expert, -1);
    for (int k = 0; k < (int) l.expert_in_slot.size(); k++) {
        const int32_t e = k < n_experts ? experts[k] : -1;
        if (e >= 0 && l.expert_in_slot[k] != e) {
            s.copy_expert(l, e, k);
            s.resident_bytes += l.slot_bytes;
        }
        l.expert_in_slot[k] = e;
        if (e >= 0) {
            l.slot_of_expert[e] = k;
        }
    }
    bool stalled = false;
    s.copier.drain(&stalled);
    l.n_resident = n_experts;
    return n_experts;
}

void rotary_sched_set_max_batch(rotary_sched_model * model, int n_tokens) {
    model->state->max_batch = n_tokens;
}

int rotary_sched_layer_stats(rotary_sched_model * model, int layer, rotary_sched_layer_stats_t * out, uint64_t * counts,
                             int n_expert) {
    Layer * found = model->state->find_layer(layer);
    if (!found) {
        return -1;
    }
    const Layer & l = *found;
    *out = { l.device_pairs, l.host_pairs, l.admissions, l.evictions, l.bytes_copied, l.prefetches };
    for (int e = 0; e < n_expert && e < l.n_expert; e++) {
        counts[e] = l.counts[e];
    }
    return l.n_expert;
}

void rotary_sched_stats(rotary_sched_model * model, rotary_sched_stats_t * out) {
    const Scheduler & s = *model->state;
    const DeviceCounters & d = s.traffic;
    *out = { s.graph_calls,     s.split_matmuls,       s.device_bytes(),     s.stall_ns,
             s.commits,         s.stalls,              d.syncs,              d.transfers,
             d.transfer_bytes,  d.off_thread_calls,    d.host_allocs,        s.copier.chunks(),
             s.copier.copy_bytes(), s.copier.copy_ns(), s.resident_bytes,    s.prompt_selections,
             s.copier.staging_bytes() + s.device.staging_bytes(), s.prefetch_stall_ns };
}

void rotary_sched_reset_stats(rotary_sched_model * model) {
    Scheduler & s = *model->state;
    s.graph_calls = s.split_matmuls = s.stall_ns = s.commits = s.stalls = s.prefetch_stall_ns = 0;
    s.resident_bytes = s.prompt_selections = 0;
    s.traffic.syncs = s.traffic.transfers = s.traffic.transfer_bytes = s.traffic.off_thread_calls = 0;
    s.copier.reset_stats();
    for (auto & entry : s.layers) {
        entry.second.device_pairs = entry.second.host_pairs = 0;
        entry.second.admissions = entry.second.evictions = entry.second.bytes_copied = entry.second.prefetches = 0;
        std::fill(entry.second.counts.begin(), entry.second.counts.end(), 0);
    }
}

void rotary_sched_set_recording(rotary_sched_model * model, int on) {
    Scheduler & s = *model->state;
    s.recording = on != 0;
    s.recording_predictions = (on & ROTARY_RECORD_PREDICTIONS) != 0;
    for (auto & entry : s.layers) {
        entry.second.routing.clear();
        entry.second.predicted.clear();
    }
}

static int64_t take(std::vector<int32_t> & record, int32_t * out, int64_t capacity) {
    if (!out) {
        return (int64_t) record.size();
    }
    const int64_t n = std::min<int64_t>(capacity, (int64_t) record.size());
    std::copy(record.begin(), record.begin() + n, out);
    record.erase(record.begin(), record.begin() + n);
    return n;
}

int64_t rotary_sched_take_routing(rotary_sched_model * model, int layer, int32_t * out, int64_t capacity) {
    Layer * found = model->state->find_layer(layer);
    return found ? take(found->routing, out, capacity) : -1;
}

int64_t rotary_sched_take_predictions(rotary_sched_model * model, int layer, int32_t * out, int64_t capacity) {
    Layer * found = model->state->find_layer(layer);
    return found ? take(found->predicted, out, capacity) : -1;
}

// Admissions (rotation, landing at the next commit) and prefetches (urgent, landing before their layer
// computes): each slot's previous expert leaves the table now, before the copy overwrites it.
static int start_copies(Scheduler & s, int layer, const int32_t * experts, const int32_t * slots, int n, bool prefetch) {
    Layer * found = s.find_layer(layer);
    if (!found) {
        return -1;
    }
    Layer & l = *found;
    for (int k = 0; k < n; k++) {
        const int32_t e = experts[k], slot = slots[k];
        const auto copying = [&](const CopyJob & job) {
            return job.layer == layer && (job.slot == slot || job.expert == e);
        };
        const bool busy = std::any_of(s.pending.begin(), s.pending.end(), copying)
                          || std::any_of(s.prefetching.begin(), s.prefetching.end(), copying);
        if (e < 0 || e >= l.n_expert || slot < 0 || slot >= (int) l.expert_in_slot.size() || busy
            || l.slot_of_expert[e] >= 0) {
            return fail("layer " + std::to_string(layer) + ": cannot copy expert " + std::to_string(e) + " into slot "
                        + std::to_string(slot) + " (out of range, resident, or already being copied)");
        }
        if (l.expert_in_slot[slot] >= 0) {
            l.slot_of_expert[l.expert_in_slot[slot]] = -1;
            l.expert_in_slot[slot] = -1;
            l.n_resident--;
            l.evictions++;
        }
        (prefetch ? l.prefetches : l.admissions)++;
        l.bytes_copied += l.slot_bytes;
        (prefetch ? s.prefetching : s.pending).push_back({ layer, e, slot });
        s.copy_expert(l, e, slot, prefetch);
    }
    return n;
}

int rotary_sched_admit(rotary_sched_model * model, int layer, const int32_t * experts, const int32_t * slots, int n) {
    return start_copies(*model->state, layer, experts, slots, n, false);
}

int rotary_sched_prefetch(rotary_sched_model * model, int layer, const int32_t * experts, const int32_t * slots,
                          int n) {
    return start_copies(*model->state, layer, experts, slots, n, true);
}

void rotary_sched_commit(rotary_sched_model * model) {
    model->state->commit();
}

int rotary_sched_set_replay(rotary_sched_model * model, int layer, const int32_t * ids, int64_t n) {
    Layer * found = model->state->find_layer(layer);
    if (!found) {
        return -1;
    }
    Layer & l = *found;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= l.n_expert) {
            return fail("layer " + std::to_string(layer) + ": replayed expert " + std::to_string(ids[i])
                        + " is out of range");
        }
    }
    l.replay.assign(ids, ids + n);
    l.replay_cursor = 0;
    l.replay_call = 0;
    return 0;
}

int64_t rotary_sched_read_slot(rotary_sched_model * model, int layer, int slot, uint8_t * out, int64_t capacity) {
    Scheduler & s = *model->state;
    Layer * found = s.find_layer(layer);
    if (!found) {
        return -1;
    }
    Layer & l = *found;
    if (slot < 0 || slot >= (int) l.expert_in_slot.size()) {
        return fail("layer " + std::to_string(layer) + " has no slot " + std::to_string(slot));
    }
    s.commit();
    int64_t done = 0;
    for (int i : l.tensors) {
        const ExpertTensor & t = s.tensors[i];
        if (done + (int64_t) t.expert_bytes > capacity) {
            return fail("slot read needs " + std::to_string(l.slot_bytes) + " bytes");
        }
        s.traffic.call();
        ggml_backend_tensor_get(t.slots, out + done, (size_t) slot * t.expert_bytes, t.expert_bytes);
        done += (int64_t) t.expert_bytes;
    }
    return done;
}

int rotary_sched_set_router(rotary_sched_model * model, int layer, const rotary_sched_router_t * router) {
    Layer * found = model->state->find_layer(layer);
    if (!found) {
        return -1;
    }
    Layer & l = *found;
    const rotary_sched_router_t & r = *router;
    if (r.n_expert != l.n_expert || r.n_embd <= 0 || r.n_used <= 0 || r.n_used > r.n_expert || !r.weight
        || r.gating < ROTARY_GATING_SOFTMAX || r.gating > ROTARY_GATING_SQRT_SOFTPLUS) {
        return fail("layer " + std::to_string(layer) + ": a router of " + std::to_string(r.n_expert) + " experts (the "
                    + "layer has " + std::to_string(l.n_expert) + "), width " + std::to_string(r.n_embd) + ", "
                    + std::to_string(r.n_used) + " used, gating " + std::to_string(r.gating));
    }
    Router & out = l.router;
    out.n_embd = r.n_embd;
    out.n_expert = r.n_expert;
    out.n_used = r.n_used;
    out.gating = r.gating;
    out.weight.resize((size_t) r.n_expert * r.n_embd);
    std::transform(r.weight, r.weight + out.weight.size(), out.weight.begin(), to_bf16);
    const auto copy = [](std::vector<float> & v, const float * from, size_t n) {
        from ? v.assign(from, from + n) : v.clear();
    };
    copy(out.logit_bias, r.logit_bias, r.n_expert);
    copy(out.select_bias, r.select_bias, r.n_expert);
    copy(out.input_scale, r.input_scale, r.n_embd);
    return 0;
}

int rotary_sched_predict(rotary_sched_model * model, int layer, const float * x, int32_t * out) {
    Scheduler & s = *model->state;
    Layer * found = s.find_layer(layer);
    if (!found) {
        return -1;
    }
    if (!found->router.configured()) {
        return fail("layer " + std::to_string(layer) + " has no router");
    }
    found->router.predict(x, out, s.predict_scratch);
    return found->router.n_used;
}
