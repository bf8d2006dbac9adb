"""The native decisions bound to a running model (CPU stand-in): the runtime's one native call per token
(routing taken from the plugin's record inside the library) decides exactly as the call that gets the
routing from Python (the path a trace or an observer takes), and the plugin carries out what was decided."""

from __future__ import annotations

import numpy as np

from rotary_gguf.gguf import open_index


def test_recorded_routing_and_python_routing_decide_alike(stand_in, wide_arch_models, open_engine, slot_budget,
                                                          prompt_ids):
    path = wide_arch_models[("qwen3moe", "q8_0")]
    budget = 2 * open_index(path).slot_bytes(0)  # two experts per token: the budget binds
    engines = [open_engine(path, "rtx4060-laptop-8gb", "rotary", ctx=256, threads=2, policy="hybrid",
                           vram_budget=slot_budget(path, 3), copy_budget=budget) for _ in range(2)]
    engines[1].rotation.watch(lambda phase, routing: None)  # routing goes through Python from now on
    outputs, stats = [], []
    for engine in engines:
        outputs.append(engine.complete(prompt_ids, 40, ignore_eos=True).tokens)
        stats.append([(s.device_pairs, s.host_pairs, s.admissions, s.evictions, s.bytes_copied)
                      for s in engine.rotation.layer_stats()])
    assert outputs[0] == outputs[1]
    assert stats[0] == stats[1] and sum(s[2] for s in stats[0]) > 0
    recorded, through_python = (engine.rotation.rotator for engine in engines)
    assert np.array_equal(recorded.native.expert_in, through_python.native.expert_in)
    assert recorded.copied_per_token.tolist() == through_python.copied_per_token.tolist()
    # The plugin's own counters are the decisions' (hits: device pairs; misses: host pairs).
    for layer, (device, host, admissions, evictions, copied) in zip(sorted(recorded.layers), stats[0], strict=True):
        c = recorded.counters[layer]
        assert (c.hits, c.misses, c.admissions, c.evictions, c.bytes_copied) == (device, host, admissions, evictions,
                                                                                 copied)
    engines[0].close()  # the binding lets go of the scheduler state with the model's handle
    assert recorded.native._bound is None
    recorded.after_token({layer: np.array([0, 1], np.int32) for layer in recorded.layers})  # standalone now
