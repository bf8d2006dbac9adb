#!/usr/bin/env python3
"""Server overhead: decode tok/s streamed through `rotary serve` (SSE, read by an HTTP client) against the engine
directly, same model, same options, one run; and the cached-prefix speedup: the time to the first token of a
long conversation's second turn, with the first turn's KV cache reused, against the same turn cold.

The server is a `rotary serve` child process; the engine is opened in this process with the same profile,
placement and options. Decode runs alternate between the two so that machine noise hits both alike; both are
timed the same way, by whoever reads the text: tokens after the first, from the first text piece to the end
of the stream (greedy, ignore_eos, the same prompt, so the same tokens). Prints medians, their spread and the ratio
server / engine (1.0 = no overhead), and the CPU time per token of each side (the server process's, from
/proc; this process's for the engine): the server's own cost, which machine noise hardly moves.

    .venv/bin/python benchmarks/server_overhead.py [MODEL.gguf] [--rounds 8] [--tokens 256]
        [--profile cpu-only] [--placement experts-on-host] [--threads N] [--ctx 4096] [--turn-tokens 3000]

Without MODEL it uses the `small` synth model from the demo cache (writing it first if needed). For the rotary
placement without a GPU, set ROTARY_SCHED_DEVICE=cpu (the plugin's stand-in device).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from rotary_gguf.demo import DEMO_PROMPT, cached_synth_model
from rotary_gguf.runtime import Engine, EngineOptions

FIELD = ("Mixture-of-experts models route every token to a few experts per layer; the routing of a conversation "
         "changes slowly, so the experts it used a moment ago are likely to be used again. ")


def start_server(args: argparse.Namespace, path: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "rotary_gguf", "serve", str(path), "--port", "0", "--profile", args.profile,
               "--placement", args.placement, "--ctx", str(args.ctx), "--max-queue", "2"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)
            ready.set() if "at http://" in line else None
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(600) or proc.poll() is not None:
        raise SystemExit("rotary serve did not start:\n" + "".join(lines))
    return proc, re.search(r"at (http://[^/ ]+)/", "".join(lines)).group(1)


def rate(tokens: int, first: float, end: float) -> float:
    """Tokens per second after the first, from the first text piece to the end of the stream."""
    return (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_decode(engine: Engine, tokens: int) -> tuple[float, float]:
    """(tokens per second, CPU microseconds per token) of one generation in this process."""
    first = None
    cpu = time.process_time()
    stream = engine.generate(DEMO_PROMPT, tokens, ignore_eos=True, keep_state=True)
    for _ in stream:
        first = first or time.perf_counter()
    n = len(stream.result.tokens)
    return rate(n, first or 0.0, time.perf_counter()), (time.process_time() - cpu) / n * 1e6


def sse(client: httpx.Client, path: str, body: dict) -> tuple[float | None, float, dict]:
    """(when the first text arrived, when the stream ended, the usage) of one streamed request."""
    first, usage = None, {}
    with client.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if first is None and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                    first = time.perf_counter()
    return first, time.perf_counter(), usage


def server_decode(client: httpx.Client, tokens: int, pid: int) -> tuple[float, float]:
    """(tokens per second as the client reads them, the server process's CPU microseconds per token)."""
    cpu = cpu_seconds(pid)
    first, end, usage = sse(client, "/v1/completions", {"model": "m", "prompt": DEMO_PROMPT, "max_tokens": tokens,
                                                        "temperature": 0, "ignore_eos": True})
    n = usage["completion_tokens"]
    return rate(n, first or 0.0, end), (cpu_seconds(pid) - cpu) / n * 1e6


def summary(name: str, values: list[float], unit: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{name:<10}{statistics.median(values):8.3f} {unit} (median of {len(values)}; sd {spread:.3f}: "
            + ", ".join(f"{v:.3f}" for v in values) + ")")


def decode_overhead(args: argparse.Namespace, engine: Engine, client: httpx.Client, pid: int) -> float:
    speed: dict[str, list[float]] = {"engine": [], "server": []}
    cpu: dict[str, list[float]] = {"engine": [], "server": []}
    runs = {"engine": lambda: engine_decode(engine, args.tokens),
            "server": lambda: server_decode(client, args.tokens, pid)}
    for name in runs:  # warm-up: first-call costs, page cache
        runs[name]()
    for round_ in range(args.rounds):
        for name in ("engine", "server") if round_ % 2 == 0 else ("server", "engine"):
            rate_, cpu_ = runs[name]()
            speed[name].append(rate_)
            cpu[name].append(cpu_)
    for name, values in speed.items():
        print(summary(name, values, "tok/s decode"))
    for name, values in cpu.items():
        print(summary(name, values, "us CPU per token"))
    ratio = statistics.median(speed["server"]) / statistics.median(speed["engine"])
    print(f"ratio server (streamed) / engine: {ratio:.3f} ({args.tokens} tokens x {args.rounds} rounds); the "
          f"server process spends {statistics.median(cpu['server']) - statistics.median(cpu['engine']):+.0f} us "
          "CPU per token more than the engine alone")
    return ratio


def first_token(client: httpx.Client, messages: list[dict]) -> tuple[float, dict, str]:
    """(seconds to the first piece, usage, text) of a chat turn."""
    body = {"model": "m", "messages": messages, "max_tokens": 16, "temperature": 0}
    started = time.perf_counter()
    text = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
        first, usage = None, {}
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    if content := choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(content)
    return (first or time.perf_counter()) - started, usage, "".join(text)


def cached_prefix(args: argparse.Namespace, engine: Engine, client: httpx.Client) -> float:
    words = engine.tokenize(FIELD)
    system = FIELD * max(1, args.turn_tokens // len(words))
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "What does that mean for VRAM?"}]
    other = [{"role": "system", "content": "Unrelated. " + system[:200]}, {"role": "user", "content": "Hello"}]
    cold, warm, cached = [], [], []
    for _ in range(args.rounds // 2 or 1):
        _, _, reply = first_token(client, turn1)
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And for RAM?"}]
        seconds, usage, _ = first_token(client, turn2)  # the first turn's KV cache is there
        warm.append(seconds)
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        first_token(client, other)  # the cache now holds another conversation
        seconds, usage, _ = first_token(client, turn2)
        cold.append(seconds)
    print(summary("cold", cold, "s to the first token"))
    print(summary("warm", warm, "s to the first token"))
    speedup = statistics.median(cold) / statistics.median(warm)
    print(f"second turn of a {usage['prompt_tokens']}-token conversation: {statistics.median(cached):.0f} prompt "
          f"tokens reused; first token {speedup:.1f}x sooner than cold")
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--profile", default="cpu-only")
    parser.add_argument("--placement", default="experts-on-host")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--turn-tokens", type=int, default=3000, help="Length of the conversation's first turn.")
    args = parser.parse_args()
    path = args.model or cached_synth_model("small")[0]
    proc, url = start_server(args, path)
    engine = Engine.open(path, args.profile, args.placement, EngineOptions(ctx=args.ctx, threads=args.threads))
    print(f"{path.name}: {engine.placement.strategy}, {engine.options.threads} threads, ctx {engine.context_size}; "
          f"server at {url}")
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            decode_overhead(args, engine, client, proc.pid)
            cached_prefix(args, engine, client)
    finally:
        engine.close()
        proc.send_signal(2)
        proc.wait(60)


if __name__ == "__main__":
    main()
