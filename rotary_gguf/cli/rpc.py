"""`rotary rpc-server`, and `--rpc`: placing a model across hosts with llama.cpp's RPC backend (docs/rpc.md)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rotary_gguf.cli import main, size_option

RPC_OPTIONS = [
    click.option("--rpc", "rpc", default=None, metavar="HOST:PORT[,...]",
                 help="llama.cpp RPC servers (`rotary rpc-server`) for the expert layers that do not fit this host; "
                      "attention and the KV cache stay here (docs/rpc.md)."),
    click.option("--host-budget", default=None,
                 help="With --rpc: host RAM this machine's part may use, e.g. 8GiB [default: the RAM available now]."),
]


def rpc_fields(rpc: str | None, host_budget: str | None) -> dict[str, object]:
    """The EngineOptions fields of --rpc and --host-budget (a malformed endpoint is an RpcError: one line)."""
    from rotary_gguf.rpc import parse_endpoints

    return {"rpc": parse_endpoints(rpc) if rpc else (), "host_budget": size_option(host_budget, "--host-budget")}


def format_hosts(index, placement, estimate, link) -> str:
    """`rotary plan --rpc`: weights, KV cache, compute and network bytes per token on each host, and the speed."""
    from rotary_gguf.report import _layers, format_bytes
    from rotary_gguf.rpc import remote_network_bytes

    network = remote_network_bytes(index, placement)
    kv = placement.kv_bytes + placement.state_bytes
    rows = [("this host", placement.host_weight_bytes + placement.gpu_weight_bytes + placement.gpu_expert_bytes,
             kv, placement.host_compute_bytes + placement.compute_bytes, "-", "attention, norms, routers, output"
             + (f"; experts of layers {_layers(_local_layers(index, placement))}" if _local_layers(index, placement)
                else ""))]
    rows += [(s.buffer, s.weight_bytes, 0, s.compute_bytes, format_bytes(network[s.buffer]),
              f"experts of layers {_layers(s.layers)}; {format_bytes(s.free_bytes)} free")
             for s in placement.remote]
    lines = [f"hosts          link {link.gbs:g} GB/s, {link.latency_us:g} us per round trip (--link-gbs, "
             "--link-latency-us)",
             f"  {'host':<26}{'weights':>12}{'KV cache':>12}{'compute':>12}{'net/token':>12}"]
    lines += [f"  {name:<26}{format_bytes(w):>12}{format_bytes(k):>12}{format_bytes(c):>12}{net:>12}  {what}"
              for name, w, k, c, net, what in rows]
    e = estimate
    lines.append(f"network        {format_bytes(e.bytes_per_token)} per token in {e.round_trips_per_token} round trips "
                 f"({e.seconds_per_token * 1000:.2f} ms); predicted ~{e.predicted_tok_s:.1f} tok/s decode with the "
                 "weight reads")
    return "\n".join(lines)


def _local_layers(index, placement) -> list[int]:
    remote = {layer for s in placement.remote for layer in s.layers}
    return [layer for layer in index.moe_layers if layer not in placement.gpu_expert_layers and layer not in remote]


@main.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes an unauthenticated protocol (use an SSH tunnel).")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option("--mem", default=None,
              help="Memory the server's CPU device reports as free, e.g. 8GiB: what clients place against "
                   "[default: all of this machine's RAM]. Not enforced on allocations.")
@click.option("--cache", "tensor_cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep received tensors in DIR/rpc, so a client that reloads the model sends large tensors "
                   "as hashes (llama.cpp's rpc-server -c).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: physical cores].")
@click.option("--build-only", is_flag=True, help="Build (or find) the server and print its path; do not run it.")
def rpc_server(host: str, port: int, mem: str | None, tensor_cache: Path | None, threads: int | None,
               build_only: bool) -> None:
    """Run llama.cpp's rpc-server from the pinned llama-cpp-python sdist (built once into the rotary cache,
    against the installed llama.cpp: CPU, or its GPU when that build has CUDA) until Ctrl-C."""
    from rotary_gguf.rpc_server import build_rpc_server, exposure_warning, server_command
    from rotary_gguf.runtime import default_threads

    limit = size_option(mem, "--mem")
    binary = build_rpc_server(say=lambda text: click.echo(text, err=True))
    if build_only:
        click.echo(str(binary))
        return
    warning = exposure_warning(host)
    if warning:
        click.echo(click.style(warning, fg="red", bold=True), err=True)
    command, env = server_command(binary, host, port, threads or default_threads(), limit, tensor_cache)
    os.execve(command[0], command, env)  # the server is this process: signals and exit status are its own
