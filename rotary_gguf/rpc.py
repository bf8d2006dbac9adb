"""Placing a model across hosts with llama.cpp's RPC backend (docs/rpc.md): server endpoints, the devices
they expose, and the remote part of a placement - whole layers of routed experts that do not fit the local
host go to remote devices - with the network traffic per token that implies. Pure functions; the runtime
asks the servers (rotary_gguf.runtime.rpc) and loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex, TensorClass
from rotary_gguf.plan import Override, Placement, RemoteShare, expert_pattern

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
# The RPC protocol's framing (ggml-rpc.cpp): a command is 1 byte + an 8-byte size; a serialized tensor
# (struct rpc_tensor) is 296 bytes.
_COMMAND_BYTES = 9
_RESPONSE_BYTES = 8
RPC_TENSOR_BYTES = 296
# The scheduler sends a remote layer's graph with every compute (the RPC device re-runs only the graph it saw
# last): its 24-25 nodes and their sources, 59-63 rpc_tensors for a qwen3moe MoE block (GGML_RPC_DEBUG=1 on
# the server, benchmarks/rpc_loopback.py).
GRAPH_TENSORS_PER_LAYER = 61
_GRAPH_NODES_PER_LAYER = 24
# The first remote layer of each token also serializes ~55 rpc_tensors per layer before it (measured: 556
# tensors for layer 9 instead of 61; ~94 KiB a token with layers 6-11 remote, none with every layer remote):
# fitted, the cause in the scheduler's split inputs not worked out (docs/rpc.md).
_ANCESTRY_TENSORS_PER_LAYER = 55
_HOST = re.compile(r"^[A-Za-z0-9.\-_]+$")


class RpcError(RotaryError):
    """An RPC server cannot be used as asked, or the model cannot be placed across the servers."""


@dataclass(frozen=True)
class Endpoint:
    """One rpc-server, host:port (llama.cpp splits at the first colon, so no IPv6 literals)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """'HOST:PORT[,HOST:PORT...]' -> endpoints; RpcError names the malformed one."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"--rpc {text!r}: {item!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT}; "
                           "port 1-65535; an IPv6 server needs a host name)")
        endpoint = Endpoint(host, int(port))
        if endpoint in endpoints:
            raise RpcError(f"--rpc {text!r}: {endpoint} is named twice")
        endpoints.append(endpoint)
    return tuple(endpoints)


@dataclass(frozen=True)
class RemoteDevice:
    """A device an rpc-server exposes, as the RPC backend reports it."""

    endpoint: Endpoint
    device: int  # its index on that server
    free_bytes: int
    total_bytes: int

    @property
    def buffer(self) -> str:
        """llama.cpp's name of its buffer type, which `-ot PATTERN=RPC0[host:port]` names too."""
        return f"RPC{self.device}[{self.endpoint}]"


@dataclass(frozen=True)
class Link:
    """The network between this host and the servers: bandwidth and one round trip's latency."""

    gbs: float = 1.25  # 10 Gbit/s Ethernet
    latency_us: float = 100.0


def remote_compute_bytes(index: ModelIndex, ubatch: int) -> int:
    """A remote device's compute buffer for its MoE layers: the ubatch's input rows, the experts'
    gate/up/down activations and the output rows (f32), with the same 1.2 margin as the local planner."""
    p = index.params
    rows = ubatch * (2 * p.n_embd + p.n_expert + p.n_expert_used * (3 * p.n_ff_exp + p.n_embd + 2))
    return int(1.2 * 4 * rows)


def layer_network_bytes(index: ModelIndex) -> int:
    """Bytes over the socket per decoded token for one remote MoE layer. The scheduler gives the RPC device
    the whole MoE block (routing, experts, the residual add): in go the normed input row, the residual row
    and the router's logits, back comes the layer's output row (f32); plus the four commands' framing (each
    names its tensor as an rpc_tensor) and the layer's graph."""
    p = index.params
    activations = 4 * (3 * p.n_embd + p.n_expert)  # two rows and the logits in, one row out
    framing = 4 * (_COMMAND_BYTES + RPC_TENSOR_BYTES + 16) + _RESPONSE_BYTES
    return activations + framing + _GRAPH_BYTES


_GRAPH_BYTES = GRAPH_TENSORS_PER_LAYER * RPC_TENSOR_BYTES + _GRAPH_NODES_PER_LAYER * 8 + 12
_RECOMPUTE_BYTES = _COMMAND_BYTES + 4  # GRAPH_RECOMPUTE: the device's index


def _host_expert_layers(index: ModelIndex, placement: Placement) -> list[int]:
    return [layer for layer in index.moe_layers if layer not in placement.gpu_expert_layers]


def _layer_bytes(index: ModelIndex, layer: int) -> int:
    row = index.bytes_by_layer.get(layer, {})
    return row.get(TensorClass.ROUTED_EXPERT.value, 0) + row.get(TensorClass.EXPERT_BIAS.value, 0)


def place_remote(index: ModelIndex, placement: Placement, devices: tuple[RemoteDevice, ...], host_budget: int,
                 ubatch: int) -> Placement:
    """Move whole layers of host experts onto remote devices until the local host's share fits host_budget:
    the last layers first (layer-fill gives the first ones VRAM), each device filled in the order given up to
    its free memory less its compute buffer. Attention, norms, routers and the KV cache stay local."""
    if placement.strategy == "rotary":
        raise RpcError("--placement rotary cannot use --rpc: the scheduler plugin computes only experts in host "
                       "memory, so experts on an RPC server would bypass its slots; use layer-fill or "
                       "experts-on-host")
    excess = placement.predicted_host_bytes - host_budget
    if excess <= 0 or not devices:
        return placement
    compute = remote_compute_bytes(index, ubatch)
    room = [max(0, d.free_bytes - compute) for d in devices]
    shares: list[list[int]] = [[] for _ in devices]
    device = 0
    for layer in reversed(_host_expert_layers(index, placement)):
        size = _layer_bytes(index, layer)
        while device < len(devices) and size > room[device]:
            device += 1
        if excess <= 0 or device == len(devices):
            break
        shares[device].append(layer)
        room[device] -= size
        excess -= size
    if excess > 0:
        free = sum(d.free_bytes for d in devices)
        raise RpcError(f"{index.path.name}: needs {excess / 2**30:.2f} GiB more than the host budget "
                       f"{host_budget / 2**30:.2f} GiB after filling {len(devices)} RPC device(s) "
                       f"({free / 2**30:.2f} GiB free, less {compute / 2**20:.0f} MiB compute each); "
                       "add an RPC server, or raise --host-budget")
    remote = tuple(RemoteShare(d.buffer, tuple(sorted(layers)), sum(_layer_bytes(index, x) for x in layers),
                               compute, d.free_bytes)
                   for d, layers in zip(devices, shares, strict=True) if layers)
    return _with_remote(index, placement, remote)


def _with_remote(index: ModelIndex, placement: Placement, remote: tuple[RemoteShare, ...]) -> Placement:
    moved = {layer for share in remote for layer in share.layers}
    host = [layer for layer in _host_expert_layers(index, placement) if layer not in moved]
    overrides = tuple(Override(expert_pattern(list(s.layers)), s.buffer) for s in remote)
    # The local overrides keep their place after the remote ones (llama.cpp takes the first match).
    overrides += (Override(expert_pattern(host), "CPU"),) if host else ()
    return replace(placement, overrides=overrides, remote=remote,
                   host_weight_bytes=placement.host_weight_bytes - sum(s.weight_bytes for s in remote))


def remote_network_bytes(index: ModelIndex, placement: Placement) -> dict[str, int]:
    """Bytes over the socket per decoded token to and from each remote device of the placement: its layers'
    layer_network_bytes, and on the device of the first remote layer the graph's ancestry - except on a device
    with one layer, which re-runs the graph it has (a GRAPH_RECOMPUTE command instead)."""
    first = min((layer for share in placement.remote for layer in share.layers), default=0)
    per_layer = layer_network_bytes(index)
    return {share.buffer: per_layer - _GRAPH_BYTES + _RECOMPUTE_BYTES if len(share.layers) == 1
            else len(share.layers) * per_layer
            + (first * _ANCESTRY_TENSORS_PER_LAYER * RPC_TENSOR_BYTES if first in share.layers else 0)
            for share in placement.remote}


@dataclass(frozen=True)
class NetworkEstimate:
    """What a placement across hosts moves per decoded token, and the speed that implies."""

    bytes_per_token: int
    round_trips_per_token: int
    seconds_per_token: float
    predicted_tok_s: float


def network_estimate(index: ModelIndex, placement: Placement, local_tok_s: float, link: Link) -> NetworkEstimate:
    """Per token: one round trip per remote layer (the output row is read back before the next layer's
    attention) and remote_network_bytes, over `link`; local_tok_s is the weight-read bound."""
    layers = sum(len(s.layers) for s in placement.remote)
    nbytes = sum(remote_network_bytes(index, placement).values())
    network = layers * link.latency_us * 1e-6 + (nbytes / (link.gbs * 1e9) if link.gbs else 0.0)
    seconds = (1 / local_tok_s if local_tok_s else 0.0) + network
    return NetworkEstimate(nbytes, layers, network, 1 / seconds if seconds else 0.0)
