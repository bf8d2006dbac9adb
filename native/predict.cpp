// Cross-layer prefetch, the prediction: a layer's router applied to the previous MoE layer's input gives the
// experts the layer will most likely select (the hidden state changes little from one layer to the next),
// early enough to copy them into slots before the layer computes. The scores follow build_moe_ffn
// (llama-graph.cpp): logits = W (x * input_scale) + logit_bias, gated, plus the selection bias; top n_used.
// Expert groups (DeepSeek V3's n_group) are not applied: a prediction may name an expert of an unused group.
#include "scheduler.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <numeric>

namespace rotary {

// Router weights are kept as bfloat16 (the top half of a float): half the memory a prediction reads per
// layer, and a shift to widen, which the compiler vectorises. Round to nearest even, as numpy's reference.
uint16_t to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return (uint16_t) ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// 32 partial sums (four AVX vectors, so that the additions do not wait on one another): the compiler
// vectorises them without -ffast-math; on x86-64 a second version for AVX2 + FMA is chosen at load time
// where the CPU has them (the plugin is built for any x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static float dot(const uint16_t * a, const float * b, int64_t n) {
    constexpr int kLanes = 32;
    float acc[kLanes] = { 0 };
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (int j = 0; j < kLanes; j++) {
            const uint32_t bits = (uint32_t) a[i + j] << 16;
            float w;
            std::memcpy(&w, &bits, sizeof(w));
            acc[j] += w * b[i + j];
        }
    }
    for (; i < n; i++) {
        const uint32_t bits = (uint32_t) a[i] << 16;
        float w;
        std::memcpy(&w, &bits, sizeof(w));
        acc[i % kLanes] += w * b[i];
    }
    for (int j = 8; j < kLanes; j++) {
        acc[j % 8] += acc[j];
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void Router::predict(const float * x, int32_t * out, std::vector<float> & scratch) const {
    scratch.resize((size_t) n_embd + n_expert);
    const float * input = x;
    if (!input_scale.empty()) {
        for (int64_t i = 0; i < n_embd; i++) {
            scratch[i] = x[i] * input_scale[i];
        }
        input = scratch.data();
    }
    float * score = scratch.data() + n_embd;
    for (int e = 0; e < n_expert; e++) {
        score[e] = dot(&weight[(size_t) e * n_embd], input, n_embd) + (logit_bias.empty() ? 0.f : logit_bias[e]);
    }
    // Gating is monotonic: it changes the ranking only through the selection bias added after it.
    if (!select_bias.empty()) {
        if (gating == ROTARY_GATING_SOFTMAX) {
            const float top = *std::max_element(score, score + n_expert);
            float total = 0;
            for (int e = 0; e < n_expert; e++) {
                score[e] = std::exp(score[e] - top);
                total += score[e];
            }
            for (int e = 0; e < n_expert; e++) {
                score[e] /= total;
            }
        } else if (gating == ROTARY_GATING_SIGMOID) {
            for (int e = 0; e < n_expert; e++) {
                score[e] = 1.f / (1.f + std::exp(-score[e]));
            }
        } else if (gating == ROTARY_GATING_SQRT_SOFTPLUS) {
            for (int e = 0; e < n_expert; e++) {
                score[e] = std::sqrt(score[e] > 20.f ? score[e] : std::log1p(std::exp(score[e])));
            }
        }
        for (int e = 0; e < n_expert; e++) {
            score[e] += select_bias[e];
        }
    }
    std::vector<int32_t> order(n_expert);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + n_used, order.end(), [score](int32_t a, int32_t b) {
        return score[a] != score[b] ? score[a] > score[b] : a < b;
    });
    std::copy_n(order.begin(), n_used, out);
}

// At the first expert matmul of `layer` in a single-token batch: predict the next MoE layer's experts from
// this layer's input, record the prediction and hand it to the bound decisions, which may start copies.
void Scheduler::predict_next(int layer, const ggml_tensor * input, const ggml_tensor * ids) {
    const auto next = layers.upper_bound(layer);
    if (next == layers.end() || ids->ne[1] != 1) {
        return;
    }
    Layer & target = next->second;
    const Router & router = target.router;
    const bool prefetching = decide && decide_prefetching(decide);
    if (!router.configured() || input->ne[0] != router.n_embd || !(recording_predictions || prefetching)) {
        return;
    }
    prediction.resize(router.n_used);
    router.predict((const float *) input->data, prediction.data(), predict_scratch);
    if (recording_predictions) {
        target.predicted.insert(target.predicted.end(), prediction.begin(), prediction.end());
    }
    if (prefetching) {
        rotary_decide_prefetch(decide, next->first, prediction.data(), router.n_used);
    }
}

}  // namespace rotary
