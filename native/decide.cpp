// Rotation decisions (rotary_sched.h, "Rotation decisions"): the slot tables of every MoE layer, their
// counters and the policy that rotates them, one call per decoded token. Needs no llama.cpp model (the
// simulator replays traces through it); bound to a model state, it hands commits, admissions and
// residency straight to that state's copier. rotary_gguf/rotation.py is its Python face.
#include "rotary_sched.h"
#include "scheduler.h"  // rotary_sched_model: a binding holds the model's state alive

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

int fail(const std::string & message) {
    rotary::set_error(message);
    return -1;
}

// numpy's pairwise summation (what np.mean does), so that a prior normalised here equals one normalised
// by numpy bit for bit.
double pairwise_sum(const double * a, int64_t n) {
    if (n < 8) {
        double res = 0.;
        for (int64_t i = 0; i < n; i++) {
            res += a[i];
        }
        return res;
    }
    if (n <= 128) {
        double r[8];
        std::copy(a, a + 8, r);
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8) {
            for (int j = 0; j < 8; j++) {
                r[j] += a[i + j];
            }
        }
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) {
            res += a[i];
        }
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// values / mean(values), or zeros when the mean is not positive.
void unit_mean(const double * values, int n, double * out) {
    const double mean = n ? pairwise_sum(values, n) / n : 0.;
    for (int e = 0; e < n; e++) {
        out[e] = mean > 0 ? values[e] / mean : 0.;
    }
}

struct Candidate {
    int row;
    int32_t expert;
    int64_t fairness;
    double value;
};

}  // namespace

struct rotary_decide {
    std::vector<rotary_decide_layer_t> layers;  // by row (ascending layer)
    std::map<int, int> row_of;
    rotary_decide_policy_t policy{};
    int rows = 0, width = 1, depth = 0;
    int64_t step = 0;
    std::vector<int32_t> slot_of, expert_in;  // [rows x width], [rows x depth]
    std::vector<uint8_t> busy;                // [rows x depth]
    std::vector<rotary_decide_counters_t> counters;
    std::vector<double> base;        // RECENCY: step last selected (-1: never); FREQUENCY: decayed selections
    std::vector<int64_t> decayed_to;  // FREQUENCY: the step each row's scores are decayed to
    std::vector<double> request, calibration, scale;
    std::vector<rotary_decide_copy_t> pending;
    std::vector<uint64_t> copied;
    std::unique_ptr<rotary_sched_model> bound;  // our own handle on the bound model's state
    rotary_sched_model * model = nullptr;
    // Scratch, kept to avoid allocations per token.
    std::vector<double> factor, victim_value, decay_power;  // decay_power[k] = pow(decay, k)
    std::vector<int> rank;
    std::vector<uint8_t> closed, victims_ready, victim_used;
    std::vector<uint32_t> mark;
    uint32_t epoch = 0;
    std::vector<Candidate> candidates;
    std::vector<int32_t> recorded;
    std::vector<int64_t> recorded_counts;
    // Prefetch (rotary_decide_prefetch_t): this token's predictions and prefetches per row ([rows x width]).
    bool prefetch_on = false, decoding = false;
    rotary_decide_prefetch_t prefetch_params{};
    int64_t budget_now = -1;        // the last after_token's budget (< 0: none)
    uint64_t prefetched_bytes = 0;  // this token
    std::vector<double> recall;
    std::vector<int32_t> predicted_ids, prefetched_ids;
    std::vector<int> predicted_n, prefetched_n;

    bool prior() const { return policy.request_weight != 0 || policy.calibration_weight != 0; }
    bool frequency() const { return policy.kind == ROTARY_DECIDE_FREQUENCY; }

    // pow(decay, k), from a table for the usual small k (the same std::pow values, computed once).
    double decay_to(int64_t k) const {
        return k >= 0 && k < (int64_t) decay_power.size() ? decay_power[k] : std::pow(policy.decay, (double) k);
    }

    // Every row's decay to the current step (FREQUENCY), as the values need it.
    void decay_factors() {
        for (int r = 0; r < rows; r++) {
            factor[r] = frequency() ? decay_to(step - decayed_to[r]) : 1.;
        }
    }

    double value(int row, int32_t e) const {
        const size_t i = (size_t) row * width + e;
        const double v = frequency() ? base[i] * factor[row] : base[i];
        if (!prior()) {
            return v;
        }
        return v + scale[row] * (policy.request_weight * request[i] + policy.calibration_weight * calibration[i]);
    }

    // The policy learns n selections of one row at the current step.
    void observe(int row, const int32_t * ids, int64_t n) {
        double * b = &base[(size_t) row * width];
        if (!frequency()) {
            for (int64_t i = 0; i < n; i++) {
                b[ids[i]] = (double) step;
            }
            return;
        }
        const double f = decay_to(step - decayed_to[row]);
        for (int e = 0; e < width; e++) {
            b[e] *= f;
        }
        for (int64_t i = 0; i < n; i++) {
            b[ids[i]] += 1.;
        }
        decayed_to[row] = step;
    }

    int check_ids(const int32_t * ids, const int64_t * counts) const {
        int64_t offset = 0;
        for (int r = 0; r < rows; r++) {
            const int64_t n = std::max<int64_t>(0, counts[r]);
            for (int64_t i = 0; i < n; i++) {
                const int32_t e = ids[offset + i];
                if (e < 0 || e >= layers[r].n_expert) {
                    return fail("layer " + std::to_string(layers[r].layer) + ": expert " + std::to_string(e)
                                + " routed, the layer has " + std::to_string(layers[r].n_expert));
                }
            }
            offset += n;
        }
        return 0;
    }

    int commit() {
        if (model) {
            rotary_sched_commit(model);
        }
        for (const rotary_decide_copy_t & c : pending) {
            const int r = row_of.at(c.layer);
            slot_of[(size_t) r * width + c.expert] = c.slot;
            expert_in[(size_t) r * depth + c.slot] = c.expert;
            busy[(size_t) r * depth + c.slot] = 0;
        }
        pending.clear();
        return 0;
    }

    int set_resident(int row, std::vector<int32_t> chosen) {
        const rotary_decide_layer_t & l = layers[row];
        if ((int) chosen.size() > l.n_slots) {
            return fail("layer " + std::to_string(l.layer) + ": " + std::to_string(chosen.size()) + " experts for "
                        + std::to_string(l.n_slots) + " slots");
        }
        std::vector<uint8_t> seen(l.n_expert, 0);
        for (int32_t e : chosen) {
            if (e < 0 || e >= l.n_expert || seen[e]) {
                return fail("layer " + std::to_string(l.layer) + ": expert " + std::to_string(e)
                            + " is out of range or given twice");
            }
            seen[e] = 1;
        }
        // Those already resident stay in their slots; newcomers take the other slots in the order given.
        int32_t * in = &expert_in[(size_t) row * depth];
        std::vector<uint8_t> stays(l.n_expert, 0);
        for (size_t k = 0; k < chosen.size(); k++) {
            if (in[k] >= 0 && seen[in[k]]) {
                stays[in[k]] = 1;
            }
        }
        std::vector<int32_t> placed(chosen.size());
        size_t next = 0;
        for (size_t k = 0; k < chosen.size(); k++) {
            if (in[k] >= 0 && stays[in[k]]) {
                placed[k] = in[k];
                continue;
            }
            while (stays[chosen[next]]) {
                next++;
            }
            placed[k] = chosen[next++];
        }
        if (model && rotary_sched_set_resident(model, l.layer, placed.data(), (int) placed.size()) < 0) {
            return -1;
        }
        std::fill_n(&slot_of[(size_t) row * width], width, -1);
        std::fill_n(in, depth, -1);
        for (size_t k = 0; k < placed.size(); k++) {
            slot_of[(size_t) row * width + placed[k]] = (int32_t) k;
            in[k] = placed[k];
        }
        return 0;
    }

    int after_prompt(const int32_t * ids, const int64_t * counts) {
        if (check_ids(ids, counts) < 0) {
            return -1;
        }
        commit();
        decoding = true;
        prefetched_bytes = 0;
        std::fill(predicted_n.begin(), predicted_n.end(), 0);
        std::fill(prefetched_n.begin(), prefetched_n.end(), 0);
        int64_t offset = 0;
        for (int r = 0; r < rows; r++) {
            const rotary_decide_layer_t & l = layers[r];
            const int64_t n = std::max<int64_t>(0, counts[r]);
            const int32_t * mine = ids + offset;
            offset += n;
            if (l.n_slots == 0 || n == 0) {
                continue;
            }
            observe(r, mine, n);
            std::vector<double> hist(l.n_expert, 0.);
            for (int64_t i = 0; i < n; i++) {
                hist[mine[i]] += 1.;
            }
            unit_mean(hist.data(), l.n_expert, &request[(size_t) r * width]);
            // Most selected first, residents before others at equal counts, then by expert id.
            std::vector<int32_t> order(l.n_expert);
            for (int32_t e = 0; e < l.n_expert; e++) {
                order[e] = e;
            }
            const int32_t * slot = &slot_of[(size_t) r * width];
            std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
                if (hist[a] != hist[b]) {
                    return hist[a] > hist[b];
                }
                return (slot[a] >= 0) > (slot[b] >= 0);
            });
            order.resize(std::min(l.n_slots, l.n_expert));
            if (set_resident(r, order) < 0) {
                return -1;
            }
        }
        return 0;
    }

    // Row r's slots give way in order of value: empty first (-inf), then residents from the least valued,
    // slots being copied (or beyond the layer's count) never (+inf); ties by slot. The values are taken
    // once per token, when the row first needs a victim; each next victim is the least of those left.
    void victims(int r) {
        if (victims_ready[r]) {
            return;
        }
        victims_ready[r] = 1;
        for (int k = 0; k < depth; k++) {
            const size_t at = (size_t) r * depth + k;
            victim_value[at] = busy[at] ? kInf : expert_in[at] >= 0 ? value(r, expert_in[at]) : -kInf;
            victim_used[at] = 0;
        }
    }

    int next_victim(int r) {
        const double * v = &victim_value[(size_t) r * depth];
        const uint8_t * used = &victim_used[(size_t) r * depth];
        int best = -1;
        for (int k = 0; k < depth; k++) {
            if (!used[k] && (best < 0 || v[k] < v[best])) {
                best = k;
            }
        }
        return best;
    }

    void collect_candidates(const int32_t * ids, const int64_t * counts) {
        candidates.clear();
        if (++epoch == 0) {
            std::fill(mark.begin(), mark.end(), 0);
            epoch = 1;
        }
        const int64_t turns = std::max(1, rows);
        int present = 0;
        int64_t offset = 0;
        for (int r = 0; r < rows; r++) {
            if (counts[r] < 0) {
                continue;
            }
            rank[r] = present++;
            const int64_t n = counts[r];
            const int32_t * mine = ids + offset;
            offset += n;
            if (layers[r].n_slots == 0) {
                continue;
            }
            const int64_t fairness = ((rank[r] - step) % turns + turns) % turns;
            for (int64_t i = 0; i < n; i++) {
                const size_t at = (size_t) r * width + mine[i];
                if (slot_of[at] >= 0 || mark[at] == epoch) {
                    continue;
                }
                mark[at] = epoch;
                candidates.push_back({ r, mine[i], fairness, value(r, mine[i]) });
            }
        }
        // Best first: by value, then a rotating layer order (no layer always first to the budget), row, expert.
        std::sort(candidates.begin(), candidates.end(), [](const Candidate & a, const Candidate & b) {
            if (a.value != b.value) {
                return a.value > b.value;
            }
            if (a.fairness != b.fairness) {
                return a.fairness < b.fairness;
            }
            return a.row != b.row ? a.row < b.row : a.expert < b.expert;
        });
    }

    int admit(const int32_t * ids, const int64_t * counts, int64_t budget) {
        decay_factors();
        collect_candidates(ids, counts);
        std::fill(closed.begin(), closed.end(), 0);
        std::fill(victims_ready.begin(), victims_ready.end(), 0);
        uint64_t total = 0;
        for (const Candidate & c : candidates) {
            const uint64_t size = layers[c.row].slot_bytes;
            if (closed[c.row] || (budget >= 0 && total + size > (uint64_t) budget)) {
                continue;
            }
            victims(c.row);
            const int slot = next_victim(c.row);
            if (slot < 0 || !(c.value > victim_value[(size_t) c.row * depth + slot] + policy.admit_margin)) {
                closed[c.row] = 1;
                continue;
            }
            const size_t at = (size_t) c.row * depth + slot;
            victim_used[at] = 1;
            const int32_t victim = expert_in[at];
            rotary_decide_counters_t & counter = counters[c.row];
            if (victim >= 0) {
                slot_of[(size_t) c.row * width + victim] = -1;
                counter.evictions++;
            }
            expert_in[at] = -1;
            busy[at] = 1;
            pending.push_back({ layers[c.row].layer, c.expert, slot, victim });
            total += size;
            counter.admissions++;
            counter.bytes_copied += size;
        }
        copied.push_back(total + prefetched_bytes);
        prefetched_bytes = 0;
        return model ? send_pending() : (int) pending.size();
    }

    // The copies of this token to the model's copier, one call per layer in the order of first admission.
    int send_pending() {
        std::vector<int> layer_order;
        for (const rotary_decide_copy_t & c : pending) {
            if (std::find(layer_order.begin(), layer_order.end(), c.layer) == layer_order.end()) {
                layer_order.push_back(c.layer);
            }
        }
        std::vector<int32_t> experts, slots;
        for (int layer : layer_order) {
            experts.clear();
            slots.clear();
            for (const rotary_decide_copy_t & c : pending) {
                if (c.layer == layer) {
                    experts.push_back(c.expert);
                    slots.push_back(c.slot);
                }
            }
            if (rotary_sched_admit(model, layer, experts.data(), slots.data(), (int) experts.size()) < 0) {
                return -1;
            }
        }
        return (int) pending.size();
    }

    // Bytes this token may still copy on predictions: the budget less the admissions still being copied
    // (started after the previous token, landing during this one) and this token's prefetches.
    int64_t prefetch_room() const {
        if (budget_now < 0) {
            return std::numeric_limits<int64_t>::max();
        }
        int64_t spent = (int64_t) prefetched_bytes;
        for (const rotary_decide_copy_t & c : pending) {
            spent += (int64_t) layers[row_of.at(c.layer)].slot_bytes;
        }
        return budget_now - spent;
    }

    bool incoming(int layer, int32_t e) const {
        return std::any_of(pending.begin(), pending.end(),
                           [&](const rotary_decide_copy_t & c) { return c.layer == layer && c.expert == e; });
    }

    int prefetch(int r, const int32_t * ids, int n) {
        const rotary_decide_layer_t & l = layers[r];
        if (n < 0 || n > l.n_expert) {
            return fail("layer " + std::to_string(l.layer) + ": a prediction of " + std::to_string(n) + " experts");
        }
        for (int i = 0; i < n; i++) {
            if (ids[i] < 0 || ids[i] >= l.n_expert) {
                return fail("layer " + std::to_string(l.layer) + ": expert " + std::to_string(ids[i])
                            + " predicted, the layer has " + std::to_string(l.n_expert));
            }
        }
        if (!prefetch_on || !decoding) {
            return 0;
        }
        std::copy_n(ids, n, &predicted_ids[(size_t) r * width]);
        predicted_n[r] = n;
        if (l.n_slots == 0 || recall[r] < prefetch_params.min_recall) {
            return 0;
        }
        // The row's slots give way as to an admission (victims), except those holding a predicted expert.
        factor[r] = frequency() ? decay_to(step - decayed_to[r]) : 1.;
        victims_ready[r] = 0;
        victims(r);
        for (int k = 0; k < depth; k++) {
            const int32_t e = expert_in[(size_t) r * depth + k];
            victim_used[(size_t) r * depth + k] = e >= 0 && std::find(ids, ids + n, e) != ids + n;
        }
        // An even share of what is left for this row and the rows after it (predictions come in layer order),
        // so that the first layers do not take a tight budget whole.
        int64_t room = prefetch_room() / std::max(1, rows - r);
        std::vector<int32_t> experts, slots;
        for (int i = 0; i < n; i++) {
            const int32_t e = ids[i];
            if (slot_of[(size_t) r * width + e] >= 0 || incoming(l.layer, e) || prefetched_n[r] >= width) {
                continue;
            }
            const int slot = next_victim(r);
            if (slot < 0 || victim_value[(size_t) r * depth + slot] == kInf || (int64_t) l.slot_bytes > room) {
                break;
            }
            const size_t at = (size_t) r * depth + slot;
            const int32_t victim = expert_in[at];
            rotary_decide_counters_t & counter = counters[r];
            if (victim >= 0) {
                slot_of[(size_t) r * width + victim] = -1;
                counter.evictions++;
            }
            expert_in[at] = e;
            slot_of[(size_t) r * width + e] = slot;
            victim_used[at] = 1;
            room -= (int64_t) l.slot_bytes;
            prefetched_bytes += l.slot_bytes;
            counter.prefetches++;
            counter.bytes_copied += l.slot_bytes;
            prefetched_ids[(size_t) r * width + prefetched_n[r]++] = e;
            experts.push_back(e);
            slots.push_back(slot);
        }
        if (model && !experts.empty()
            && rotary_sched_prefetch(model, l.layer, experts.data(), slots.data(), (int) experts.size()) < 0) {
            return -1;
        }
        return (int) experts.size();
    }

    // A decoded token's routing against its predictions: recall, useful prefetches; then they are spent.
    void score_predictions(const int32_t * ids, const int64_t * counts) {
        int64_t offset = 0;
        for (int r = 0; r < rows; r++) {
            const int64_t n = std::max<int64_t>(0, counts[r]);
            const int32_t * mine = ids + offset;
            offset += n;
            if (predicted_n[r] == 0 || n == 0) {
                predicted_n[r] = prefetched_n[r] = 0;
                continue;
            }
            const int32_t * predicted = &predicted_ids[(size_t) r * width];
            const int32_t * prefetched = &prefetched_ids[(size_t) r * width];
            uint64_t right = 0, useful = 0;
            for (int64_t i = 0; i < n; i++) {
                right += std::find(predicted, predicted + predicted_n[r], mine[i]) != predicted + predicted_n[r];
                useful += std::find(prefetched, prefetched + prefetched_n[r], mine[i]) != prefetched + prefetched_n[r];
            }
            rotary_decide_counters_t & counter = counters[r];
            counter.predicted += (uint64_t) n;
            counter.predicted_right += right;
            counter.prefetch_hits += useful;
            const double decay = prefetch_params.recall_decay;
            recall[r] = decay * recall[r] + (1 - decay) * ((double) right / (double) n);
            predicted_n[r] = prefetched_n[r] = 0;
        }
    }

    int after_token(const int32_t * ids, const int64_t * counts, int64_t budget) {
        if (check_ids(ids, counts) < 0) {
            return -1;
        }
        step++;
        int64_t offset = 0;
        for (int r = 0; r < rows; r++) {
            const int64_t n = std::max<int64_t>(0, counts[r]);
            uint64_t hits = 0;
            for (int64_t i = 0; i < n; i++) {
                hits += slot_of[(size_t) r * width + ids[offset + i]] >= 0;
            }
            counters[r].hits += hits;
            counters[r].misses += (uint64_t) n - hits;
            offset += n;
        }
        score_predictions(ids, counts);
        budget_now = budget;
        commit();
        offset = 0;
        for (int r = 0; r < rows; r++) {
            const int64_t n = std::max<int64_t>(0, counts[r]);
            if (n > 0) {
                observe(r, ids + offset, n);
            }
            offset += n;
        }
        // The token's prefetches count against its budget: copied per token stays within it.
        return admit(ids, counts, budget < 0 ? budget : std::max<int64_t>(0, budget - (int64_t) prefetched_bytes));
    }
};

using Decide = rotary_decide;

static int row_of(const Decide * d, int layer) {
    const auto it = d->row_of.find(layer);
    return it == d->row_of.end() ? fail("layer " + std::to_string(layer) + " is not one of the decision's layers")
                                 : it->second;
}

rotary_decide * rotary_decide_new(const rotary_decide_layer_t * layers, int n_layers,
                                  const rotary_decide_policy_t * policy) {
    if (n_layers < 0 || (n_layers > 0 && !layers) || !policy) {
        fail("rotary_decide_new: no layers or no policy");
        return nullptr;
    }
    if ((policy->kind != ROTARY_DECIDE_RECENCY && policy->kind != ROTARY_DECIDE_FREQUENCY) || !(policy->decay >= 0)
        || !(policy->decay < 1) || !(policy->admit_margin >= 0) || !std::isfinite(policy->admit_margin)) {
        fail("rotary_decide_new: policy kind " + std::to_string(policy->kind) + " with decay "
             + std::to_string(policy->decay) + " and admission margin " + std::to_string(policy->admit_margin)
             + " (kinds 0 and 1, decay in [0, 1), margin finite and >= 0)");
        return nullptr;
    }
    auto d = std::make_unique<Decide>();
    d->policy = *policy;
    d->layers.assign(layers, layers + n_layers);
    std::sort(d->layers.begin(), d->layers.end(),
              [](const rotary_decide_layer_t & a, const rotary_decide_layer_t & b) { return a.layer < b.layer; });
    for (const rotary_decide_layer_t & l : d->layers) {
        if (l.n_expert <= 0 || l.n_used <= 0 || l.n_slots < 0 || l.n_slots > l.n_expert
            || !d->row_of.emplace(l.layer, (int) d->row_of.size()).second) {
            fail("layer " + std::to_string(l.layer) + ": " + std::to_string(l.n_expert) + " experts, "
                 + std::to_string(l.n_used) + " used, " + std::to_string(l.n_slots)
                 + " slots (need experts > 0, used > 0, 0 <= slots <= experts, each layer once)");
            return nullptr;
        }
        d->width = std::max(d->width, l.n_expert);
        d->depth = std::max(d->depth, l.n_slots);
    }
    const int rows = d->rows = n_layers;
    const size_t cells = (size_t) rows * d->width, slots = (size_t) rows * d->depth;
    d->slot_of.assign(cells, -1);
    d->expert_in.assign(slots, -1);
    d->busy.assign(slots, 0);
    d->counters.assign(rows, rotary_decide_counters_t{});
    d->base.assign(cells, d->frequency() ? 0. : -1.);
    d->decayed_to.assign(rows, 0);
    d->request.assign(cells, 0.);
    d->calibration.assign(cells, 0.);
    d->scale.resize(rows);
    for (int r = 0; r < rows; r++) {
        const rotary_decide_layer_t & l = d->layers[r];
        std::fill_n(&d->busy[(size_t) r * d->depth + l.n_slots], d->depth - l.n_slots, 1);
        d->scale[r] = (double) l.n_used / l.n_expert / (1 - policy->decay);
    }
    d->factor.assign(rows, 1.);
    for (int k = 0; k < 256; k++) {
        d->decay_power.push_back(std::pow(policy->decay, (double) k));
    }
    d->victim_value.assign(slots, 0.);
    d->victim_used.assign(slots, 0);
    d->rank.assign(rows, 0);
    d->closed.assign(rows, 0);
    d->victims_ready.assign(rows, 0);
    d->mark.assign(cells, 0);
    d->recorded_counts.assign(rows, 0);
    d->recall.assign(rows, 1.);
    d->predicted_ids.assign(cells, 0);
    d->prefetched_ids.assign(cells, 0);
    d->predicted_n.assign(rows, 0);
    d->prefetched_n.assign(rows, 0);
    return d.release();
}

void rotary_decide_free(rotary_decide * d) {
    rotary_decide_bind(d, nullptr);
    delete d;
}

int rotary_decide_set_prior(rotary_decide * d, int layer, const double * popularity, int n_expert) {
    const int r = row_of(d, layer);
    if (r < 0) {
        return -1;
    }
    if (n_expert != d->layers[r].n_expert) {
        return fail("layer " + std::to_string(layer) + ": a prior of " + std::to_string(n_expert)
                    + " experts, the layer has " + std::to_string(d->layers[r].n_expert));
    }
    unit_mean(popularity, n_expert, &d->calibration[(size_t) r * d->width]);
    return 0;
}

void rotary_decide_bind(rotary_decide * d, rotary_sched_model * model) {
    if (d->model && d->model->state->decide == d) {
        d->model->state->decide = nullptr;
    }
    d->bound.reset(model ? new rotary_sched_model{ model->state } : nullptr);
    d->model = d->bound.get();
    if (d->model) {
        d->model->state->decide = d;  // the plugin hands it the predictions it makes during a token
    }
}

int rotary_decide_after_prompt(rotary_decide * d, const int32_t * ids, const int64_t * counts) {
    return d->after_prompt(ids, counts);
}

int rotary_decide_after_token(rotary_decide * d, const int32_t * ids, const int64_t * counts, int64_t budget) {
    return d->after_token(ids, counts, budget);
}

int rotary_decide_after_recorded_token(rotary_decide * d, int64_t budget) {
    if (!d->model) {
        return fail("rotary_decide_after_recorded_token: no model state bound");
    }
    d->recorded.clear();
    for (int r = 0; r < d->rows; r++) {
        const int layer = d->layers[r].layer;
        const int64_t n = rotary_sched_take_routing(d->model, layer, nullptr, 0);
        if (n < 0) {
            return -1;
        }
        const size_t at = d->recorded.size();
        d->recorded.resize(at + n);
        d->recorded_counts[r] = rotary_sched_take_routing(d->model, layer, d->recorded.data() + at, n);
    }
    return d->after_token(d->recorded.data(), d->recorded_counts.data(), budget);
}

int rotary_decide_set_resident(rotary_decide * d, int layer, const int32_t * experts, int n) {
    const int r = row_of(d, layer);
    return r < 0 || n < 0 ? -1 : d->set_resident(r, std::vector<int32_t>(experts, experts + n));
}

int rotary_decide_commit(rotary_decide * d) {
    return d->commit();
}

void rotary_decide_shape(const rotary_decide * d, int * rows, int * n_expert_max, int * n_slots_max) {
    *rows = d->rows;
    *n_expert_max = d->width;
    *n_slots_max = d->depth;
}

int32_t * rotary_decide_slot_of(rotary_decide * d) {
    return d->slot_of.data();
}

int32_t * rotary_decide_expert_in(rotary_decide * d) {
    return d->expert_in.data();
}

uint8_t * rotary_decide_busy(rotary_decide * d) {
    return d->busy.data();
}

rotary_decide_counters_t * rotary_decide_counters(rotary_decide * d) {
    return d->counters.data();
}

void rotary_decide_reset_counters(rotary_decide * d) {
    std::fill(d->counters.begin(), d->counters.end(), rotary_decide_counters_t{});
}

int64_t rotary_decide_step(const rotary_decide * d) {
    return d->step;
}

void rotary_decide_set_step(rotary_decide * d, int64_t step) {
    d->step = step;
}

int rotary_decide_pending(const rotary_decide * d, rotary_decide_copy_t * out, int capacity) {
    if (out) {
        std::copy_n(d->pending.begin(), std::min<size_t>(std::max(capacity, 0), d->pending.size()), out);
    }
    return (int) d->pending.size();
}

int64_t rotary_decide_copied(const rotary_decide * d, uint64_t * out, int64_t capacity) {
    if (out) {
        std::copy_n(d->copied.begin(), std::min<size_t>(std::max<int64_t>(capacity, 0), d->copied.size()), out);
    }
    return (int64_t) d->copied.size();
}

int rotary_decide_values(rotary_decide * d, double * out, int64_t capacity) {
    if (capacity < (int64_t) d->rows * d->width) {
        return fail("rotary_decide_values: room for " + std::to_string(capacity) + " values, need "
                    + std::to_string((int64_t) d->rows * d->width));
    }
    d->decay_factors();
    for (int r = 0; r < d->rows; r++) {
        for (int e = 0; e < d->width; e++) {
            out[(size_t) r * d->width + e] = d->value(r, e);
        }
    }
    return 0;
}

int rotary_decide_set_prefetch(rotary_decide * d, const rotary_decide_prefetch_t * prefetch) {
    if (prefetch && (!(prefetch->min_recall >= 0) || !(prefetch->min_recall <= 1) || !(prefetch->recall_decay >= 0)
                     || !(prefetch->recall_decay < 1))) {
        return fail("rotary_decide_set_prefetch: minimum recall " + std::to_string(prefetch->min_recall)
                    + " and recall decay " + std::to_string(prefetch->recall_decay)
                    + " (need recall in [0, 1], decay in [0, 1))");
    }
    d->prefetch_on = prefetch != nullptr;
    if (prefetch) {
        d->prefetch_params = *prefetch;
    }
    std::fill(d->recall.begin(), d->recall.end(), 1.);
    return 0;
}

void rotary_decide_set_budget(rotary_decide * d, int64_t budget) {
    d->budget_now = budget;
}

void rotary_decide_before_prompt(rotary_decide * d) {
    d->decoding = false;
}

int rotary_decide_prefetch(rotary_decide * d, int layer, const int32_t * predicted, int n) {
    const int r = row_of(d, layer);
    return r < 0 ? -1 : d->prefetch(r, predicted, n);
}

double rotary_decide_recall(const rotary_decide * d, int layer) {
    const auto it = d->row_of.find(layer);
    return it == d->row_of.end() ? -1. : d->recall[it->second];
}

namespace rotary {

bool decide_prefetching(const rotary_decide * d) {
    return d->prefetch_on && d->decoding;
}

}  // namespace rotary
