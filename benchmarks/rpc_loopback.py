#!/usr/bin/env python3
"""Across hosts on loopback: decode tok/s of one model on this host alone against the same model with its last
expert layers on two `rotary rpc-server` processes on 127.0.0.1 (llama.cpp's RPC backend), and the bytes over
the sockets per decoded token against the planner's prediction (rotary_gguf.rpc.remote_network_bytes).

Both engines are open at once; repetitions alternate which runs first. Bytes are what the servers' TCP
connections received and sent (the kernel's tcp_info through `ss`: bytes_received + bytes_acked, payload
without TCP/IP headers): a run of 1 + N decoded tokens less a run of 1, over N.

    .venv/bin/python benchmarks/rpc_loopback.py [MODEL.gguf] [--rounds 5] [--tokens 128] [--remote-layers K]
        [--threads 1] [--server-threads 1]

Without MODEL it uses the `small` synth model from the demo cache (writing it first if needed). The servers
are sized to hold K/2 expert layers each (default: every MoE layer remote, the most traffic).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rotary_gguf.demo import cached_synth_model
from rotary_gguf.report import format_bytes, format_mean_sd
from rotary_gguf.rpc import Endpoint, RpcError, remote_compute_bytes, remote_network_bytes
from rotary_gguf.runtime import Engine, EngineOptions, prepare
from rotary_gguf.runtime.rpc import probe

PROMPT = list(range(10, 42))


@contextlib.contextmanager
def rpc_server(mem: int, threads: int) -> Iterator[Endpoint]:
    """`rotary rpc-server` on a free loopback port, stopped when the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rotary_gguf", "rpc-server", "--port", str(port), "--mem", str(mem),
                             "--threads", str(threads)], stdout=subprocess.DEVNULL)
    endpoint = Endpoint("127.0.0.1", port)
    try:
        for _ in range(300):
            try:
                probe(endpoint, timeout=2)
                break
            except RpcError:
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def socket_bytes(endpoints: list[Endpoint]) -> int:
    """Bytes the servers' established connections have received and sent (the kernel's tcp_info, via `ss`)."""
    total = 0
    for endpoint in endpoints:
        listing = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{endpoint.port} )"],
                                 capture_output=True, text=True, check=True).stdout
        total += sum(int(n) for n in re.findall(r"\bbytes_(?:received|acked):(\d+)", listing))
    return total


def decode_tok_s(engine: Engine, tokens: int) -> float:
    return engine.complete(PROMPT, tokens, ignore_eos=True).decode_tokens_per_second


def bytes_per_token(engine: Engine, endpoints: list[Endpoint], tokens: int) -> float:
    before = socket_bytes(endpoints)
    engine.complete(PROMPT, 1, ignore_eos=True)
    one = socket_bytes(endpoints) - before
    before = socket_bytes(endpoints)
    engine.complete(PROMPT, 1 + tokens, ignore_eos=True)
    return (socket_bytes(endpoints) - before - one) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--remote-layers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="the client's threads (both engines)")
    parser.add_argument("--server-threads", type=int, default=1)
    args = parser.parse_args()
    path = args.model or cached_synth_model("small")[0]
    local = prepare(path, "cpu-only", "layer-fill", EngineOptions(ctx=1024, threads=args.threads))
    index = local.index
    moe = list(index.moe_layers)
    k = args.remote_layers or len(moe)
    layer = max(index.bytes_by_layer[x].get("routed_expert", 0) for x in moe)
    mem = remote_compute_bytes(index, local.profile.ubatch) + layer * -(-k // 2) + 2**20
    budget = local.placement.predicted_host_bytes - layer * k + 2**20
    with rpc_server(mem, args.server_threads) as a, rpc_server(mem, args.server_threads) as b:
        single = Engine.from_setup(local)
        across = Engine.open(path, "cpu-only", "layer-fill", EngineOptions(ctx=1024, threads=args.threads, rpc=(a, b),
                                                                         host_budget=budget))
        remote = [(s.buffer, s.layers) for s in across.placement.remote]
        predicted_bytes = sum(remote_network_bytes(index, across.placement).values())
        results: dict[str, list[float]] = {"single host": [], "2 RPC hosts": []}
        runs = {"single host": lambda: decode_tok_s(single, args.tokens),
                "2 RPC hosts": lambda: decode_tok_s(across, args.tokens)}
        decode_tok_s(single, 8), decode_tok_s(across, 8)  # warm-up
        for round_ in range(args.rounds):
            for name in (list(runs) if round_ % 2 == 0 else list(reversed(runs))):
                results[name].append(runs[name]())
        measured = bytes_per_token(across, [a, b], args.tokens)
        across.close()
        single.close()
    layers = sum(len(x) for _, x in remote)
    predicted = predicted_bytes
    print(f"{path.name}: {len(moe)} MoE layers, {layers} on RPC servers ({'; '.join(f'{n}: {x}' for n, x in remote)}), "
          f"{args.tokens} decoded tokens x {args.rounds} rounds, threads: client {args.threads}, each server "
          f"{args.server_threads}")
    for name, values in results.items():
        spread = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
        print(f"{name:<12} decode {format_mean_sd(spread)} tok/s (" + ", ".join(f"{v:.1f}" for v in values) + ")")
    print(f"socket bytes per decoded token: measured {format_bytes(measured)}, predicted {format_bytes(predicted)} "
          f"({measured / predicted:.2f}x; {measured / layers:.0f} B per remote layer)")


if __name__ == "__main__":
    main()
