// C API of the rotary expert scheduler plugin, called from Python through ctypes
// (rotary_gguf/plugin.py). Every function returning int returns 0 (or a count) on success and -1 on
// failure, with the reason in rotary_sched_last_error().
//
// The plugin is registered once per process; each model loaded with rotary placements gets a state of
// its own (rotary_sched_model: files, tensors, slots, workers, counters), which the next llama context
// created takes (rotary_sched_attach). A context created with no state attached claims no op.
#pragma once

#include <stdbool.h>
#include <stdint.h>

struct ggml_tensor;

#define ROTARY_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

// One model's scheduler state (opaque; reference-counted: a context that took it keeps it alive).
typedef struct rotary_sched_model rotary_sched_model;

// Per layer, since the last reset_stats.
typedef struct rotary_sched_layer_stats_t {
    uint64_t device_pairs;  // (token, expert) pairs computed on the device, from the slots
    uint64_t host_pairs;    // pairs computed on the host
    uint64_t admissions;    // experts copied into a slot by rotation
    uint64_t evictions;     // ... that replaced a resident expert
    uint64_t bytes_copied;  // by rotation and prefetch
    uint64_t prefetches;    // experts copied into a slot ahead of their layer, on a prediction
} rotary_sched_layer_stats_t;

// Per model, since the last reset_stats (device_bytes: held now).
typedef struct rotary_sched_stats_t {
    uint64_t graph_calls;    // graph_compute calls
    uint64_t split_matmuls;  // expert matmuls (or chains) split between device and host
    uint64_t device_bytes;   // slots, scratch and staging held on the device
    uint64_t stall_ns;       // nanoseconds commits waited for copies
    uint64_t commits;        // commits that had copies to wait for
    uint64_t stalls;         // ... whose copies had not all reached staging yet
    uint64_t device_syncs;   // blocking waits on a device stream (workers and copier)
    uint64_t transfers;      // host <-> device copies issued (activations, ids, outputs, slot chunks)
    uint64_t transfer_bytes;
    uint64_t off_thread_calls;  // device calls made on the copier's thread (0 by design)
    uint64_t host_allocs;    // staging allocations (pinned on a GPU), ever
    uint64_t copy_chunks;    // chunks (<= 256 KiB) the copier moved from the file to staging
    uint64_t copy_bytes;
    uint64_t copy_ns;        // time the copier's thread spent copying them (its measured rate)
    uint64_t resident_bytes; // copied by set_resident
    uint64_t prompt_selections;  // counted by the eval callback (batches the plugin did not claim)
    uint64_t staging_bytes;  // host staging held (pinned on a GPU)
    uint64_t prefetch_stall_ns;  // nanoseconds layers waited for their prefetched experts' copies
} rotary_sched_stats_t;

// "rotary-sched <abi>; llama-cpp-python <version>; ggml backend API <n>": checked by Python at load.
ROTARY_API const char * rotary_sched_build_info(void);
ROTARY_API const char * rotary_sched_last_error(void);

// Register the scheduler as a ggml ACCEL device (once per process, after llama_backend_init and before
// a context is created). device: "gpu" keeps expert slots on the first GPU; "cpu" uses a second CPU
// backend as a stand-in device (tests and machines without a GPU).
ROTARY_API int rotary_sched_register(const char * device);
ROTARY_API const char * rotary_sched_device_description(void);

// A new, empty model state (its own host and device backends and copier); NULL when not registered.
ROTARY_API rotary_sched_model * rotary_sched_model_new(void);
// Drop the handle (and the pending mark, if it has one); the state lives on while a context holds it.
ROTARY_API void rotary_sched_model_free(rotary_sched_model * model);
// The next llama context created in this process takes this state (NULL: none does). Contexts are
// created by llama_init_from_model, dry runs included: attach right before the context that serves it.
ROTARY_API void rotary_sched_attach(rotary_sched_model * model);
// How many llama contexts (live backends) hold this state.
ROTARY_API int rotary_sched_model_contexts(const rotary_sched_model * model);

// Configure a model: its GGUF files (mapped read-only; returns the file's index) and its routed-expert
// tensors (name as in the GGUF, absolute offset of expert 0, bytes per expert, ggml type and shape).
ROTARY_API int rotary_sched_add_file(rotary_sched_model * model, const char * path);
ROTARY_API int rotary_sched_add_tensor(rotary_sched_model * model, const char * name, int file, uint64_t offset,
                                       uint64_t expert_bytes, int n_expert, int type, int64_t ne0, int64_t ne1);

// Allocate n_slots expert slots for a layer on the device (all its expert tensors), empty.
ROTARY_API int rotary_sched_set_slots(rotary_sched_model * model, int layer, int n_slots);
// Make these experts the layer's residents (at most n_slots), copying their blocks from the file.
// Call between llama_decode calls, never during one.
ROTARY_API int rotary_sched_set_resident(rotary_sched_model * model, int layer, const int32_t * experts,
                                         int n_experts);
// Prompt batches of more than n tokens are left to llama.cpp (its own GPU offload); <= 0: no limit.
ROTARY_API void rotary_sched_set_max_batch(rotary_sched_model * model, int n_tokens);

// Rotation. Admit experts into slots: each slot's previous expert leaves the slot table at once, the
// copy runs in the background, and the expert enters the table at the next commit (which waits for the
// copies still running). Call both between llama_decode calls.
ROTARY_API int rotary_sched_admit(rotary_sched_model * model, int layer, const int32_t * experts,
                                  const int32_t * slots, int n);
ROTARY_API void rotary_sched_commit(rotary_sched_model * model);
// Prefetch: as admit, but the copies go ahead of the rotation's and the experts enter the table before
// their layer next computes (which waits for them). Called by the bound decisions during a token.
ROTARY_API int rotary_sched_prefetch(rotary_sched_model * model, int layer, const int32_t * experts,
                                     const int32_t * slots, int n);

// Cross-layer prediction. A layer's router, as build_moe_ffn (llama-graph.cpp) applies it: scores =
// gating(W (x * input_scale) + logit_bias) + select_bias, top n_used. In a single-token batch, at the first
// expert matmul of each MoE layer, the plugin applies the next MoE layer's router to this layer's input:
// the prediction is recorded (with routing) and handed to the bound decisions (rotary_decide_prefetch).
enum {
    ROTARY_GATING_SOFTMAX = 0,
    ROTARY_GATING_SIGMOID = 1,
    ROTARY_GATING_SOFTMAX_WEIGHT = 2,  // the logits themselves
    ROTARY_GATING_SQRT_SOFTPLUS = 3,
};

typedef struct rotary_sched_router_t {
    int64_t n_embd;
    int32_t n_expert;
    int32_t n_used;
    int32_t gating;             // ROTARY_GATING_*
    const float * weight;       // [n_expert][n_embd] (kept as bfloat16, rounded to nearest even)
    const float * logit_bias;   // [n_expert] or NULL
    const float * select_bias;  // [n_expert] or NULL (exp_probs_b)
    const float * input_scale;  // [n_embd] or NULL
} rotary_sched_router_t;

ROTARY_API int rotary_sched_set_router(rotary_sched_model * model, int layer, const rotary_sched_router_t * router);
// The layer's router on input x (n_embd floats): writes n_used expert ids, best first; returns n_used.
ROTARY_API int rotary_sched_predict(rotary_sched_model * model, int layer, const float * x, int32_t * out);

// Routing record: while on, the ids of every MoE block are kept per layer (token-major, n_expert_used
// per token) until taken; on | ROTARY_RECORD_PREDICTIONS keeps the plugin's predictions too (routers set).
// take with out == NULL returns how many are waiting.
enum { ROTARY_RECORD_PREDICTIONS = 2 };
ROTARY_API void rotary_sched_set_recording(rotary_sched_model * model, int on);
ROTARY_API int64_t rotary_sched_take_routing(rotary_sched_model * model, int layer, int32_t * out, int64_t capacity);
// The predictions of this layer's experts made while recording (n_used per predicted token), as take_routing.
ROTARY_API int64_t rotary_sched_take_predictions(rotary_sched_model * model, int layer, int32_t * out,
                                                 int64_t capacity);

// Benchmarks only: substitute these ids (token-major, cycled) for the router's in this layer; n = 0 stops.
ROTARY_API int rotary_sched_set_replay(rotary_sched_model * model, int layer, const int32_t * ids, int64_t n);

// Tests: the bytes of one slot (every tensor of the layer, in order); returns the count.
ROTARY_API int64_t rotary_sched_read_slot(rotary_sched_model * model, int layer, int slot, uint8_t * out,
                                          int64_t capacity);

// Prompt routing for batches the plugin does not claim (above set_max_batch): a llama.cpp eval callback
// (ggml_backend_sched_eval_callback) that asks only for ffn_moe_topk nodes of such batches and counts
// them as the plugin counts its own. Pass rotary_sched_eval_data(model) as its user data; the state
// lives as long as a context holds it.
ROTARY_API bool rotary_sched_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
ROTARY_API void * rotary_sched_eval_data(rotary_sched_model * model);

// The buffer type a context holding this state was given for its split boundaries ("" before a context
// exists): the GPU's pinned host type on a GPU, the CPU's own type on the stand-in.
ROTARY_API const char * rotary_sched_boundary_buffer_type(rotary_sched_model * model);

// Statistics since the last reset. Per layer, with counts[e]: selections of expert e (n_expert entries);
// returns the layer's number of experts.
ROTARY_API int rotary_sched_layer_stats(rotary_sched_model * model, int layer, rotary_sched_layer_stats_t * out,
                                        uint64_t * counts, int n_expert);
ROTARY_API void rotary_sched_stats(rotary_sched_model * model, rotary_sched_stats_t * out);
ROTARY_API void rotary_sched_reset_stats(rotary_sched_model * model);

// ---- Rotation decisions (native/decide.cpp) ----------------------------------------------------------
// Which experts the slots hold, token by token: one decision object per model (or simulated trace),
// usable with no llama.cpp model at all (the simulator) or bound to a model state, whose copier then
// receives the admissions directly. Layers are kept in ascending layer order ("rows").
//
// After a prompt, each layer's slots take the prompt's most selected experts (residents win ties). After
// each decoded token: count the token's hits, commit the previous token's copies, let the policy observe
// the routing, then admit the missed experts best first while the copy budget lasts, each into its
// layer's next slot to give way (empty slots first, then residents from the least valued) if it is worth
// more than that slot's expert. A slot being copied is out of the table until the next commit.
//
// Policy: an expert's value is base + scale * (request_weight * request + calibration_weight * calibration),
// scale = n_used / n_expert / (1 - decay) (the steady-state mean decayed score); base is the step it
// was last selected in (RECENCY) or its selections decayed by `decay` per token (FREQUENCY); request is
// the last prompt's routing and calibration the set_prior popularity, each normalised to mean 1.
typedef struct rotary_decide rotary_decide;

enum { ROTARY_DECIDE_RECENCY = 0, ROTARY_DECIDE_FREQUENCY = 1 };

typedef struct rotary_decide_policy_t {
    int32_t kind;  // ROTARY_DECIDE_RECENCY or ROTARY_DECIDE_FREQUENCY
    double decay;  // per decoded token (FREQUENCY), in [0, 1)
    double request_weight;
    double calibration_weight;
    double admit_margin;  // a missed expert takes a slot only when worth more than its resident plus this (>= 0)
} rotary_decide_policy_t;

typedef struct rotary_decide_layer_t {
    int32_t layer;
    int32_t n_expert;
    int32_t n_used;
    int32_t n_slots;
    uint64_t slot_bytes;  // bytes copied to admit one expert
} rotary_decide_layer_t;

// Per layer, since the last reset_counters.
typedef struct rotary_decide_counters_t {
    uint64_t hits;  // decoded (token, expert) selections served from a slot
    uint64_t misses;
    uint64_t admissions;
    uint64_t evictions;  // by admissions and prefetches
    uint64_t bytes_copied;  // by admissions and prefetches
    uint64_t prefetches;  // experts copied on a prediction, ahead of their layer
    uint64_t prefetch_hits;  // ... that the token then selected
    uint64_t predicted;  // decoded selections in tokens that had a prediction for the layer
    uint64_t predicted_right;  // ... that the prediction named (recall = predicted_right / predicted)
} rotary_decide_counters_t;

// Cross-layer prefetch. During a decoded token, each prediction of a layer's experts (rotary_decide_prefetch:
// from the plugin, or replayed from a trace) copies its experts that are neither resident nor being copied
// into the layer's slots, best first, while the token's copy budget lasts: the budget of the last after_token
// less the bytes still being copied for it, shared evenly by this layer and the layers after it (the
// token's admissions then get what its prefetches left, so that neither the bytes copied per token nor
// the bytes in flight during a token exceed the budget). Victims are the slots that would give way to an admission,
// never a predicted expert's. Prefetched experts serve the same token. A layer's prediction recall (decayed
// per predicted token, starting at 1) below min_recall switches its prefetch off until it recovers.
typedef struct rotary_decide_prefetch_t {
    double min_recall;    // in [0, 1]
    double recall_decay;  // in [0, 1)
} rotary_decide_prefetch_t;

// A copy started by the last after_token (victim: the expert it evicted, -1 for an empty slot).
typedef struct rotary_decide_copy_t {
    int32_t layer;
    int32_t expert;
    int32_t slot;
    int32_t victim;
} rotary_decide_copy_t;

// NULL on failure (bad shapes or policy; reason in rotary_sched_last_error).
ROTARY_API rotary_decide * rotary_decide_new(const rotary_decide_layer_t * layers, int n_layers,
                                             const rotary_decide_policy_t * policy);
ROTARY_API void rotary_decide_free(rotary_decide * d);
// The calibration prior of a layer: its experts' popularity (n_expert values, normalised here).
ROTARY_API int rotary_decide_set_prior(rotary_decide * d, int layer, const double * popularity, int n_expert);
// From now on commits, admissions and set_resident also go to this model state (NULL: to nothing); the
// binding keeps the state alive (as a context does) until d is freed or bound elsewhere.
ROTARY_API void rotary_decide_bind(rotary_decide * d, rotary_sched_model * model);

// Routing is given per row (ascending layer order): counts[i] ids of row i, concatenated in ids
// (token-major); counts[i] < 0: the layer is absent from this step's routing (not the same as 0 ids:
// present layers take turns first to the budget).
ROTARY_API int rotary_decide_after_prompt(rotary_decide * d, const int32_t * ids, const int64_t * counts);
// Returns how many copies it started (see rotary_decide_pending); budget < 0: no limit.
ROTARY_API int rotary_decide_after_token(rotary_decide * d, const int32_t * ids, const int64_t * counts,
                                         int64_t budget);
// Bound only: after_token on the routing the model recorded since the last take (taking it).
ROTARY_API int rotary_decide_after_recorded_token(rotary_decide * d, int64_t budget);
// Fill a layer's slots with these experts (a synchronous copy when bound): those already resident stay in
// their slots, the others take the remaining slots in the order given.
ROTARY_API int rotary_decide_set_resident(rotary_decide * d, int layer, const int32_t * experts, int n);
ROTARY_API int rotary_decide_commit(rotary_decide * d);
// Prefetch on with these parameters (NULL: off). Off by default.
ROTARY_API int rotary_decide_set_prefetch(rotary_decide * d, const rotary_decide_prefetch_t * prefetch);
// Predictions count only while decoding: from after_prompt until before_prompt.
// The budget prefetches use until the next after_token brings its own (< 0: no limit).
ROTARY_API void rotary_decide_set_budget(rotary_decide * d, int64_t budget);
ROTARY_API void rotary_decide_before_prompt(rotary_decide * d);
// A prediction of a layer's experts for the token being decoded (best first); returns the copies it started.
ROTARY_API int rotary_decide_prefetch(rotary_decide * d, int layer, const int32_t * predicted, int n);
// A layer's prediction recall now (the decayed average that switches its prefetch).
ROTARY_API double rotary_decide_recall(const rotary_decide * d, int layer);

// Tables, [rows x n_expert_max] and [rows x n_slots_max] (entries beyond a layer's own count unused),
// owned by d and valid while it lives: slot_of[e] (-1: not resident), expert_in[slot] (-1: empty or being
// copied), busy[slot] (being copied, or beyond the layer's slots).
ROTARY_API void rotary_decide_shape(const rotary_decide * d, int * rows, int * n_expert_max, int * n_slots_max);
ROTARY_API int32_t * rotary_decide_slot_of(rotary_decide * d);
ROTARY_API int32_t * rotary_decide_expert_in(rotary_decide * d);
ROTARY_API uint8_t * rotary_decide_busy(rotary_decide * d);
ROTARY_API rotary_decide_counters_t * rotary_decide_counters(rotary_decide * d);  // [rows]
ROTARY_API void rotary_decide_reset_counters(rotary_decide * d);
ROTARY_API int64_t rotary_decide_step(const rotary_decide * d);
ROTARY_API void rotary_decide_set_step(rotary_decide * d, int64_t step);
// The copies started by the last after_token and not yet committed; returns their count.
ROTARY_API int rotary_decide_pending(const rotary_decide * d, rotary_decide_copy_t * out, int capacity);
// Bytes copied after each decoded token, ever; returns how many tokens (out == NULL: just the count).
ROTARY_API int64_t rotary_decide_copied(const rotary_decide * d, uint64_t * out, int64_t capacity);
// Every expert's value now, [rows x n_expert_max] (tests and tools).
ROTARY_API int rotary_decide_values(rotary_decide * d, double * out, int64_t capacity);

#ifdef __cplusplus
}
#endif
