// C API of the rotary expert scheduler plugin, called from Python through ctypes
// (rotary_gguf/plugin.py). Every function returning int returns 0 (or a count) on success and -1 on
// failure, with the reason in rotary_sched_last_error().
#pragma once

#include <stdint.h>

#define ROTARY_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

// "rotary-sched <abi>; llama-cpp-python <version>; ggml backend API <n>": checked by Python at load.
ROTARY_API const char * rotary_sched_build_info(void);
ROTARY_API const char * rotary_sched_last_error(void);

// Register the scheduler as a ggml ACCEL device (once per process, after llama_backend_init and before
// a context is created). device: "gpu" keeps expert slots on the first GPU; "cpu" uses a second CPU
// backend as a stand-in device (tests and machines without a GPU).
ROTARY_API int rotary_sched_register(const char * device);
ROTARY_API const char * rotary_sched_device_description(void);

// Forget the configured model: free all slots, claim no op until configured again.
ROTARY_API void rotary_sched_reset(void);

// Configure a model: its GGUF files (mapped read-only; returns the file's index) and its routed-expert
// tensors (name as in the GGUF, absolute offset of expert 0, bytes per expert, ggml type and shape).
ROTARY_API int rotary_sched_add_file(const char * path);
ROTARY_API int rotary_sched_add_tensor(const char * name, int file, uint64_t offset, uint64_t expert_bytes,
                            int n_expert, int type, int64_t ne0, int64_t ne1);

// Allocate n_slots expert slots for a layer on the device (all its expert tensors), empty.
ROTARY_API int rotary_sched_set_slots(int layer, int n_slots);
// Make these experts the layer's residents (at most n_slots), copying their blocks from the file.
// Call between llama_decode calls, never during one.
ROTARY_API int rotary_sched_set_resident(int layer, const int32_t * experts, int n_experts);
// Prompt batches of more than n tokens are left to llama.cpp (its own GPU offload); <= 0: no limit.
ROTARY_API void rotary_sched_set_max_batch(int n_tokens);

// Rotation. Admit experts into slots: each slot's previous expert leaves the slot table at once, the
// copy runs in the background, and the expert enters the table at the next commit (which waits for the
// copies still running). Call both between llama_decode calls.
ROTARY_API int rotary_sched_admit(int layer, const int32_t * experts, const int32_t * slots, int n);
ROTARY_API void rotary_sched_commit(void);

// Routing record: while on, the ids of every MoE block are kept per layer (token-major, n_expert_used
// per token) until taken. take with out == NULL returns how many are waiting.
ROTARY_API void rotary_sched_set_recording(int on);
ROTARY_API int64_t rotary_sched_take_routing(int layer, int32_t * out, int64_t capacity);

// Benchmarks only: substitute these ids (token-major, cycled) for the router's in this layer; n = 0 stops.
ROTARY_API int rotary_sched_set_replay(int layer, const int32_t * ids, int64_t n);

// Statistics since the last reset. Per layer: out[0] (token, expert) pairs computed on the device,
// out[1] pairs computed on the host, out[2] admissions, out[3] evictions, out[4] bytes copied;
// counts[e]: selections of expert e (n_expert entries).
ROTARY_API int rotary_sched_layer_stats(int layer, uint64_t * out, uint64_t * counts, int n_expert);
// Process-wide: out[0] graph_compute calls, out[1] expert matmuls split between device and host,
// out[2] device bytes held (slots, scratch, staging), out[3] nanoseconds commits waited for copies,
// out[4] commits that had copies to wait for.
ROTARY_API void rotary_sched_stats(uint64_t * out);
ROTARY_API void rotary_sched_reset_stats(void);

#ifdef __cplusplus
}
#endif
