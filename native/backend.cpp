// The ggml backend of the scheduler (modelled on ggml-blas.cpp): an ACCEL device that llama.cpp puts
// ahead of its CPU backend. It claims the routed-expert matmuls whose weights are in host memory, and
// the activation ops between them, so that one MoE block's expert FFN is one split; it computes the
// split on its own CPU backend except the expert matmuls of layers with resident experts, which it
// divides between the device and the CPU (scheduler.cpp).
//
// llama.cpp creates one backend of every ACCEL device in each new context; that backend takes the model
// state attached last (rotary_sched_attach) in its context, and a device of its own whose context is that
// state, because supports_op is asked of the device (ggml_backend_supports_op). No state: it claims nothing.
#include "rotary_sched.h"
#include "scheduler.h"

#include "ggml-backend-impl.h"
#include "ggml-impl.h"

#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#ifndef ROTARY_LLAMA_CPP_PYTHON_VERSION
#error "ROTARY_LLAMA_CPP_PYTHON_VERSION must name the llama-cpp-python version the headers come from"
#endif
#define ROTARY_SCHED_ABI 6
#define ROTARY_STR_(x) #x
#define ROTARY_STR(x) ROTARY_STR_(x)

using namespace rotary;

// Router and combination nodes of build_moe_ffn (llama-graph.cpp) stay with llama.cpp's backends.
static const char * const kRouterPrefixes[] = {
    "ffn_moe_logits", "ffn_moe_probs", "ffn_moe_group", "ffn_moe_argsort", "ffn_moe_topk",
    "ffn_moe_weight", "ffn_moe_out",
};

// The layer of an expert-FFN node named by llama.cpp's graph callback ("ffn_moe_swiglu-12"), or -1.
static int expert_ffn_layer(const char * name) {
    if (std::strncmp(name, "ffn_moe_", 8) != 0) {
        return -1;
    }
    for (const char * prefix : kRouterPrefixes) {
        if (std::strncmp(name, prefix, std::strlen(prefix)) == 0) {
            return -1;
        }
    }
    const char * dash = std::strrchr(name, '-');
    return dash ? std::atoi(dash + 1) : -1;
}

static bool is_view(const ggml_tensor * op) {
    return op->op == GGML_OP_VIEW || op->op == GGML_OP_RESHAPE || op->op == GGML_OP_PERMUTE
           || op->op == GGML_OP_TRANSPOSE;
}

// dev->context: the state of the backend owning this device (nullptr for the registered device and for
// backends of contexts created with no state attached).
static bool supports_op(ggml_backend_dev_t dev, const ggml_tensor * op) {
    const Scheduler * s = (const Scheduler *) dev->context;
    // Expert-FFN nodes are [width, experts used, tokens]: a large prompt batch is left whole to llama.cpp.
    if (!s || !s->configured() || (s->max_batch > 0 && op->ne[2] > s->max_batch)) {
        return false;
    }
    const ggml_backend_dev_t cpu = process().cpu_dev;
    if (op->op == GGML_OP_MUL_MAT_ID) {
        const ggml_tensor * x = op->src[1];
        return s->tensor_by_name.count(op->src[0]->name) && x->type == GGML_TYPE_F32 && op->type == GGML_TYPE_F32
               && x->nb[0] == sizeof(float) && ggml_backend_dev_supports_op(cpu, op);
    }
    const int layer = expert_ffn_layer(op->name);
    if (layer < 0 || !s->layers.count(layer)) {
        return false;
    }
    if (is_view(op)) {
        return !(op->view_src && op->view_src->buffer);  // views of results, never of weights or caches
    }
    return op->op != GGML_OP_NONE && ggml_backend_dev_supports_op(cpu, op);
}

static ggml_status compute_on_host(Scheduler & s, ggml_cgraph * graph, int first, int end) {
    if (end <= first) {
        return GGML_STATUS_SUCCESS;
    }
    ggml_cgraph view = ggml_graph_view(graph, first, end);
    return ggml_backend_graph_compute(s.host.backend, &view);
}

static bool computes(const ggml_tensor * node) {
    return (node->flags & GGML_TENSOR_FLAG_COMPUTE) && node->op != GGML_OP_NONE && !is_view(node);
}

// The expert FFN of a MoE block as llama.cpp builds it (build_moe_ffn): from node `first` (a MUL_MAT_ID),
// the computing nodes are exactly two matmuls of one input and ids, an activation of both, and the down
// matmul of the activation. Returns the down node's index, or -1 for any other shape (biases, scales,
// fused gate_up): those run one matmul at a time.
static int expert_ffn_end(Scheduler & s, ggml_cgraph * graph, int first) {
    const ggml_tensor * found[4];
    int n = 0, end = -1;
    for (int i = first; i < graph->n_nodes && n < 4; i++) {
        if (computes(graph->nodes[i])) {
            found[n++] = graph->nodes[i];
            end = i;
        }
    }
    if (n < 4) {
        return -1;
    }
    const ggml_tensor *a = found[0], *b = found[1], *glu = found[2], *down = found[3];
    const bool shape = b->op == GGML_OP_MUL_MAT_ID && down->op == GGML_OP_MUL_MAT_ID && glu->op == GGML_OP_GLU
                       && a->src[1] == b->src[1] && a->src[2] == b->src[2] && down->src[2] == a->src[2]
                       && down->src[1] == glu && ((glu->src[0] == a && glu->src[1] == b)
                                                 || (glu->src[0] == b && glu->src[1] == a));
    const int ia = shape ? s.bind(a->src[0]) : -1;
    const int ib = shape ? s.bind(b->src[0]) : -1;
    const int id = shape ? s.bind(down->src[0]) : -1;
    return ia >= 0 && ib >= 0 && id >= 0 ? end : -1;
}

// The chains of one block (or one lone matmul) for the device, from the slots, and for the host.
static void make_chains(Scheduler & s, ggml_tensor * first, ggml_tensor * down, Chain & on_device, Chain & on_host) {
    on_device = {};
    on_host = {};
    on_device.out = on_host.out = down;
    on_device.w_out = s.slots_of(down);
    on_host.w_out = down->src[0];
    if (first == down) {
        on_device.input = on_host.input = down->src[1];
        return;
    }
    const ggml_tensor * glu = down->src[1];
    on_device.input = on_host.input = first->src[1];
    on_device.glu = on_host.glu = glu;
    on_device.w_glu0 = s.slots_of(glu->src[0]);
    on_device.w_glu1 = s.slots_of(glu->src[1]);
    on_host.w_glu0 = glu->src[0]->src[0];
    on_host.w_glu1 = glu->src[1]->src[0];
}

// A backend of one context: its state (shared with the Python handle and other contexts) and its device.
struct BackendContext {
    std::shared_ptr<Scheduler> state;
    ggml_backend_device device;
};

static Scheduler * state_of(ggml_backend_t backend) {
    return ((BackendContext *) backend->context)->state.get();
}

static ggml_status graph_compute(ggml_backend_t backend, ggml_cgraph * graph) {
    Scheduler * state = state_of(backend);
    if (!state) {
        return GGML_STATUS_FAILED;  // claims no op: never given a split
    }
    Scheduler & s = *state;
    s.graph_calls++;
    s.compute_serial++;
    s.copier.pump(false);  // a defined point for the copy path's device calls: this thread, between splits
    int first = 0;
    for (int i = 0; i < graph->n_nodes; i++) {
        ggml_tensor * node = graph->nodes[i];
        if (node->op != GGML_OP_MUL_MAT_ID || !(node->flags & GGML_TENSOR_FLAG_COMPUTE)) {
            continue;
        }
        const int index = s.bind(node->src[0]);
        if (index < 0) {
            continue;
        }
        const int layer_id = s.tensors[index].layer;
        Layer & layer = s.layers.at(layer_id);
        s.land_prefetched();  // experts predicted for this layer, before it counts or computes
        if (!layer.replay.empty() && layer.replay_call != s.compute_serial) {
            s.replay(node->src[2], layer);
        }
        if (layer.predict_call != s.compute_serial) {  // the layer's first expert matmul: its input is x
            layer.predict_call = s.compute_serial;
            s.predict_next(layer_id, node->src[1], node->src[2]);
        }
        const int end = layer.n_resident ? expert_ffn_end(s, graph, i) : -1;
        ggml_tensor * down = end >= 0 ? graph->nodes[end] : node;
        const int down_index = end >= 0 ? s.bind(down->src[0]) : index;
        if (s.tensors[down_index].counts_routing) {
            s.count(node->src[2], layer);
        }
        if (layer.n_resident == 0) {
            continue;  // every pair on the host: the node stays in the host run
        }
        Chain on_device, on_host;
        make_chains(s, node, down, on_device, on_host);
        const int last = end >= 0 ? end : i;
        ggml_status status = compute_on_host(s, graph, first, i);
        if (status == GGML_STATUS_SUCCESS && !s.compute_pairs(on_device, on_host, node->src[2], layer)) {
            status = compute_on_host(s, graph, i, last + 1);  // a worker refused: the nodes on the host as they are
        }
        if (status != GGML_STATUS_SUCCESS) {
            return status;
        }
        first = last + 1;
        i = last;
    }
    const ggml_status status = compute_on_host(s, graph, first, graph->n_nodes);
    // The chunks the copier filled meanwhile (a prefetch for the next layer, predicted at this split's start)
    // go out now, so that their transfer overlaps what runs on the device before the next layer's split.
    s.copier.pump(false);
    return status;
}

static const char * backend_name(ggml_backend_t) {
    return "ROTARY";
}

static void backend_free(ggml_backend_t backend) {
    auto * context = (BackendContext *) backend->context;
    if (context->state) {
        context->state->contexts--;
    }
    delete context;  // the last holder of the state destroys it
    delete backend;
}

static const ggml_backend_i kBackend = {
    /* .get_name            = */ backend_name,
    /* .free                = */ backend_free,
    /* .set_tensor_async    = */ nullptr,
    /* .get_tensor_async    = */ nullptr,
    /* .set_tensor_2d_async = */ nullptr,
    /* .get_tensor_2d_async = */ nullptr,
    /* .cpy_tensor_async    = */ nullptr,
    /* .synchronize         = */ nullptr,
    /* .graph_plan_create   = */ nullptr,
    /* .graph_plan_free     = */ nullptr,
    /* .graph_plan_update   = */ nullptr,
    /* .graph_plan_compute  = */ nullptr,
    /* .graph_compute       = */ graph_compute,
    /* .event_record        = */ nullptr,
    /* .event_wait          = */ nullptr,
    /* .graph_optimize      = */ nullptr,
};

static ggml_guid_t backend_guid() {
    static ggml_guid guid = { 0x72, 0x6f, 0x74, 0x61, 0x72, 0x79, 0x2d, 0x73,
                              0x63, 0x68, 0x65, 0x64, 0x2d, 0x76, 0x30, 0x31 };
    return &guid;
}

// The state attached for the next context (rotary_sched_attach), taken by its backend. Never destroyed:
// a state still pending at exit must not be torn down after ggml's own statics.
struct Pending {
    std::mutex mutex;
    std::shared_ptr<Scheduler> state;
};

static Pending & pending() {
    static Pending * instance = new Pending;
    return *instance;
}

static ggml_backend_buffer_type_t boundary_buffer_type() {
    const Process & p = process();
    ggml_backend_buffer_type_t pinned = p.gpu ? ggml_backend_dev_host_buffer_type(p.slot_dev) : nullptr;
    return pinned ? pinned : ggml_backend_dev_buffer_type(p.cpu_dev);
}

static ggml_backend_t init_backend(ggml_backend_dev_t dev, const char *) {
    auto * context = new BackendContext;
    {
        std::lock_guard<std::mutex> lock(pending().mutex);
        context->state.swap(pending().state);
    }
    context->device = { dev->iface, dev->reg, context->state.get() };
    if (context->state) {
        context->state->contexts++;
        // A context is created after its model is loaded: from here the state's device reports the
        // slot device's host (pinned) buffer type, so split-boundary copies are pinned (the loader
        // saw the registered device, which always reports the CPU's own type).
        context->state->boundary = boundary_buffer_type();
    }
    return new ggml_backend{ backend_guid(), kBackend, &context->device, context };
}

static const char * device_name(ggml_backend_dev_t) {
    return "ROTARY";
}

static const char * device_description(ggml_backend_dev_t) {
    return process().description.c_str();
}

static void device_memory(ggml_backend_dev_t, size_t * free, size_t * total) {
    *free = 0;  // the slots' memory belongs to the device they live on; the planner accounts for it
    *total = 0;
}

static enum ggml_backend_dev_type device_type(ggml_backend_dev_t) {
    return GGML_BACKEND_DEVICE_TYPE_ACCEL;
}

static void device_props(ggml_backend_dev_t dev, ggml_backend_dev_props * props) {
    props->name = device_name(dev);
    props->description = device_description(dev);
    props->type = device_type(dev);
    device_memory(dev, &props->memory_free, &props->memory_total);
    props->caps = { /* async */ false, /* host_buffer */ false, /* buffer_from_host_ptr */ false,
                    /* events */ false, /* mmap_support */ true };
}

// The registered device (no state: what the model loader sees) reports the very CPU buffer type llama.cpp
// uses, so that the loader keeps weights where it would put them. A context's device (with a state) reports
// the type its context was given (Scheduler::boundary): the GPU's pinned host type on a GPU.
static ggml_backend_buffer_type_t device_buffer_type(ggml_backend_dev_t dev) {
    const Scheduler * s = (const Scheduler *) dev->context;
    return s && s->boundary ? s->boundary : ggml_backend_dev_buffer_type(process().cpu_dev);
}

// Host memory, and the CPU's repacking buffer types (llama.cpp's --repack path): the CPU side then computes
// from the repacked copy, the device side from the file's own layout.
static bool device_supports_buft(ggml_backend_dev_t, ggml_backend_buffer_type_t buft) {
    return ggml_backend_dev_supports_buft(process().cpu_dev, buft);
}

static const ggml_backend_device_i kDevice = {
    /* .get_name             = */ device_name,
    /* .get_description      = */ device_description,
    /* .get_memory           = */ device_memory,
    /* .get_type             = */ device_type,
    /* .get_props            = */ device_props,
    /* .init_backend         = */ init_backend,
    /* .get_buffer_type      = */ device_buffer_type,
    /* .get_host_buffer_type = */ nullptr,
    /* .buffer_from_host_ptr = */ nullptr,
    /* .supports_op          = */ supports_op,
    /* .supports_buft        = */ device_supports_buft,
    /* .offload_op           = */ nullptr,
    /* .event_new            = */ nullptr,
    /* .event_free           = */ nullptr,
    /* .event_synchronize    = */ nullptr,
};

static const char * reg_name(ggml_backend_reg_t) {
    return "ROTARY";
}

static size_t reg_device_count(ggml_backend_reg_t) {
    return 1;
}

static ggml_backend_dev_t reg_device(ggml_backend_reg_t r, size_t) {
    static ggml_backend_device device = { kDevice, r, nullptr };
    return &device;
}

// llama.cpp calls this before every ubatch with the context's thread count (found through the device's
// reg, which every backend's device keeps).
static void set_n_threads(ggml_backend_t backend, int n_threads) {
    if (Scheduler * s = state_of(backend)) {
        s->set_threads(n_threads);
    }
}

static void * reg_proc_address(ggml_backend_reg_t, const char * name) {
    return std::strcmp(name, "ggml_backend_set_n_threads") == 0 ? (void *) set_n_threads : nullptr;
}

static const ggml_backend_reg_i kReg = {
    /* .get_name         = */ reg_name,
    /* .get_device_count = */ reg_device_count,
    /* .get_device       = */ reg_device,
    /* .get_proc_address = */ reg_proc_address,
};

static ggml_backend_reg_t reg() {
    static ggml_backend_reg instance = { GGML_BACKEND_API_VERSION, kReg, nullptr };
    return &instance;
}

const char * rotary_sched_build_info(void) {
    return "rotary-sched " ROTARY_STR(ROTARY_SCHED_ABI) "; llama-cpp-python " ROTARY_LLAMA_CPP_PYTHON_VERSION
           "; ggml backend API " ROTARY_STR(GGML_BACKEND_API_VERSION);
}

const char * rotary_sched_device_description(void) {
    return process().description.c_str();
}

int rotary_sched_register(const char * device) {
    Process & p = process();
    const bool gpu = std::strcmp(device, "gpu") == 0;
    if (!gpu && std::strcmp(device, "cpu") != 0) {
        set_error(std::string("unknown slot device '") + device + "' (gpu or cpu)");
        return -1;
    }
    if (p.registered) {
        if (p.gpu != gpu) {
            set_error("the scheduler is already registered with slots on " + p.description);
            return -1;
        }
        return 0;
    }
    p.cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    p.slot_dev = gpu ? ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) : p.cpu_dev;
    if (!p.cpu_dev || !p.slot_dev) {
        set_error(gpu ? "this llama.cpp build has no GPU device" : "this llama.cpp build has no CPU device");
        return -1;
    }
    auto * threads = ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(p.cpu_dev),
                                                       "ggml_backend_set_n_threads");
    p.set_cpu_threads = (void (*)(ggml_backend_t, int)) threads;
    if (!p.set_cpu_threads) {
        set_error(std::string("the CPU backend of this llama.cpp build exports no ggml_backend_set_n_threads"));
        return -1;
    }
    p.gpu = gpu;
    p.description = std::string("rotary expert scheduler, slots on ") + ggml_backend_dev_name(p.slot_dev) + " ("
                    + ggml_backend_dev_description(p.slot_dev) + ")";
    ggml_backend_register(reg());
    p.registered = true;
    return 0;
}

rotary_sched_model * rotary_sched_model_new(void) {
    auto state = std::make_shared<Scheduler>();
    if (!state->start()) {
        return nullptr;
    }
    return new rotary_sched_model{ std::move(state) };
}

void rotary_sched_model_free(rotary_sched_model * model) {
    if (!model) {
        return;
    }
    {
        std::lock_guard<std::mutex> lock(pending().mutex);
        if (pending().state == model->state) {
            pending().state.reset();
        }
    }
    delete model;
}

void rotary_sched_attach(rotary_sched_model * model) {
    std::lock_guard<std::mutex> lock(pending().mutex);
    pending().state = model ? model->state : nullptr;
}

int rotary_sched_model_contexts(const rotary_sched_model * model) {
    return model->state->contexts.load();
}

// Counts the routing of a batch the plugin does not claim (more than max_batch tokens) from its
// ffn_moe_topk node, read on the compute thread where llama.cpp calls back (a blocking read on a GPU).
bool rotary_sched_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * s = (Scheduler *) user_data;
    if (!s || s->max_batch <= 0 || t->ne[1] <= s->max_batch || std::strncmp(t->name, "ffn_moe_topk-", 13) != 0
        || t->type != GGML_TYPE_I32) {
        return false;
    }
    auto found = s->layers.find(std::atoi(t->name + 13));
    if (found == s->layers.end()) {
        return false;
    }
    if (ask) {
        return true;
    }
    Layer & layer = found->second;
    std::vector<uint8_t> copy;
    const uint8_t * data = (const uint8_t *) t->data;
    if (!t->buffer || !ggml_backend_buffer_is_host(t->buffer)) {
        copy.resize(ggml_nbytes(t));
        s->traffic.call();
        s->traffic.syncs++;
        ggml_backend_tensor_get(t, copy.data(), 0, copy.size());
        data = copy.data();
    }
    for (int64_t token = 0; token < t->ne[1]; token++) {
        for (int64_t k = 0; k < t->ne[0]; k++) {
            const int32_t e = *(const int32_t *) (data + token * t->nb[1] + k * t->nb[0]);
            if (e < 0 || e >= layer.n_expert) {
                continue;
            }
            layer.counts[e]++;
            s->prompt_selections++;
            if (s->recording) {
                layer.routing.push_back(e);
            }
        }
    }
    return true;
}

void * rotary_sched_eval_data(rotary_sched_model * model) {
    return model->state.get();
}

const char * rotary_sched_boundary_buffer_type(rotary_sched_model * model) {
    const Scheduler & s = *model->state;
    return s.boundary ? ggml_backend_buft_name(s.boundary) : "";
}
