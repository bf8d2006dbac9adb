"""llama.cpp's RPC backend in this process: whether the loaded build has it, a handshake with each server
before anything is loaded (so a wrong host or port is one clear line), the remote devices and their free
memory as the RPC backend reports them, their buffer types for the loader, and one clear line instead of
ggml's abort when a server goes away mid-run."""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
import sys
from dataclasses import dataclass

import psutil

from rotary_gguf.gguf import ModelIndex
from rotary_gguf.plan import Placement
from rotary_gguf.profile import Profile
from rotary_gguf.rpc import Endpoint, RemoteDevice, RpcError, place_remote
from rotary_gguf.runtime.llama import GPU_DEVICE, ggml, llama_cpp
from rotary_gguf.runtime.options import EngineOptions

PROBE_TIMEOUT_S = 5.0
# ggml-rpc.cpp: RPC_CMD_HELLO = 14; the request carries RPC_CONN_CAPS_SIZE (24) capability bytes, the
# answer major, minor, patch, padding and the server's 24 bytes. The protocol of the pinned ggml-rpc.h.
_HELLO, _CAPS = 14, 24
RPC_PROTO_MAJOR = 7
_state: dict[str, object] = {}


def rpc_unavailable() -> str | None:
    """Why this llama.cpp build cannot place tensors on RPC servers, or None when it can."""
    if llama_cpp().llama_supports_rpc():
        return None
    return ("this llama-cpp-python was built without llama.cpp's RPC backend; rebuild it with "
            "-DGGML_RPC=ON (scripts/setup_env.sh does; docs/rpc.md)")


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Connect and say hello as the RPC backend does; RpcError with the reason when that fails (ggml's own
    client would abort the process instead)."""
    where = f"RPC server {endpoint}"
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as conn:
            conn.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            size = struct.unpack("<Q", _receive(conn, 8))[0]
            if size != 4 + _CAPS:
                raise RpcError(f"{where} answered a hello with {size} bytes, not {4 + _CAPS}: is it llama.cpp's "
                               "rpc-server?")
            major, minor, patch = _receive(conn, size)[:3]
    except TimeoutError:
        raise RpcError(f"{where} did not answer within {timeout:.0f} s (a server serves one client at a time: "
                       "is another program using it?)") from None
    except socket.gaierror as exc:
        raise RpcError(f"{where}: cannot resolve {endpoint.host!r}: {exc.strerror}") from None
    except OSError as exc:
        raise RpcError(f"cannot reach the {where}: {exc.strerror or exc}; start one there with `rotary rpc-server "
                       f"--port {endpoint.port}`") from None
    if major != RPC_PROTO_MAJOR:
        raise RpcError(f"{where} speaks RPC protocol {major}.{minor}.{patch}, this llama.cpp {RPC_PROTO_MAJOR}.x: "
                       "build the server from the same llama-cpp-python version (`rotary rpc-server` does)")


def _receive(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise RpcError(f"the RPC server at {conn.getpeername()[0]} closed the connection during the hello: "
                           "is it llama.cpp's rpc-server of the same version?")
        data += chunk
    return data


def _ggml_rpc() -> ctypes.CDLL:
    """libggml.so.0 with the prototypes of the registry calls used here."""
    lib = ggml()
    if not _state.get("typed"):
        for fn, restype, argtypes in (
            # ggml_backend_reg_t ggml_backend_reg_by_name(const char * name);
            (lib.ggml_backend_reg_by_name, ctypes.c_void_p, [ctypes.c_char_p]),
            # void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
            (lib.ggml_backend_reg_get_proc_address, ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
            # size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
            (lib.ggml_backend_reg_dev_count, ctypes.c_size_t, [ctypes.c_void_p]),
            # ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
            (lib.ggml_backend_reg_dev_get, ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
            # void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
            (lib.ggml_backend_dev_memory, None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                 ctypes.POINTER(ctypes.c_size_t)]),
        ):
            fn.restype, fn.argtypes = restype, argtypes
        _state["typed"] = True
    return lib


def _server_devices(endpoint: Endpoint) -> list[int]:
    """The ggml devices of one server, from the RPC backend's ggml_backend_rpc_add_server (cached by it)."""
    lib = _ggml_rpc()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    # ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
    server = add_server(str(endpoint).encode())
    if not server:
        raise RpcError(f"RPC server {endpoint} exposes no device")
    return [lib.ggml_backend_reg_dev_get(server, i) for i in range(lib.ggml_backend_reg_dev_count(server))]


def connect(endpoints: tuple[Endpoint, ...]) -> tuple[RemoteDevice, ...]:
    """Every device of every server with its free and total memory, asked through the RPC backend; each
    server is probed first, so a wrong host or port is an RpcError before anything else happens."""
    reason = rpc_unavailable()
    if reason:
        raise RpcError(f"--rpc: {reason}")
    for endpoint in endpoints:
        probe(endpoint)
    install_abort_handler()
    lib = _ggml_rpc()
    found = []
    for endpoint in endpoints:
        for i, dev in enumerate(_server_devices(endpoint)):
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            found.append(RemoteDevice(endpoint, i, free.value, total.value))
    return tuple(found)


def install_abort_handler() -> None:
    """ggml aborts the process when an RPC server closes its connection or answers garbage: say so in one
    line on stderr, then end the process (exit status 2) without the backtrace; the state of llama.cpp
    cannot be recovered in this process."""
    if "abort" in _state:
        return
    lib = ggml()
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(message: bytes) -> None:
        text = message.decode("utf-8", errors="replace").strip()
        hint = ("an RPC server went away or answered garbage; " if "RPC" in text else "")
        sys.stderr.write(f"rotary: error: llama.cpp stopped: {hint}{text}\n")
        sys.stderr.flush()
        os._exit(2)

    callback = callback_type(on_abort)
    # ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);
    lib.ggml_set_abort_callback.restype = ctypes.c_void_p
    lib.ggml_set_abort_callback.argtypes = [callback_type]
    lib.ggml_set_abort_callback(callback)
    _state["abort"] = callback  # keep the thunk alive


_BUFFER = re.compile(r"^RPC(\d+)\[(.+):(\d+)\]$")


def remote_buffer_types(placement: Placement) -> dict[str, int]:
    """llama.cpp's buffer type of each remote device the placement names (RPC<device>[host:port])."""
    return {name: ggml().ggml_backend_dev_buffer_type(dev) for name, dev in _remote_handles(placement).items()}


def _remote_handles(placement: Placement) -> dict[str, int]:
    handles = {}
    if placement.remote:  # a server that went away since planning makes ggml abort
        install_abort_handler()
    for share in placement.remote:
        m = _BUFFER.match(share.buffer)
        if m is None:
            raise RpcError(f"not an RPC buffer type name: {share.buffer!r}")
        handles[share.buffer] = _server_devices(Endpoint(m[2], int(m[3])))[int(m[1])]
    return handles


@dataclass
class ModelDevices:
    """What llama_model_params needs for a placement with remote layers: the devices (NULL-terminated: the
    first local GPU, if the plan uses it, then the remote devices), the GPU layers, and a tensor split that
    gives every layer to the local GPU (remote devices hold only the experts the overrides send them)."""

    devices: ctypes.Array | None
    n_gpu_layers: int
    tensor_split: list[float] | None


def model_devices(placement: Placement) -> ModelDevices:
    handles = list(_remote_handles(placement).values())
    if not handles:
        return ModelDevices(None, placement.n_gpu_layers, None)
    gpu = ggml().ggml_backend_dev_by_type(GPU_DEVICE)
    local = [gpu] if gpu and placement.n_gpu_layers else []
    devices = (ctypes.c_void_p * (len(local) + len(handles) + 1))(*local, *handles, None)
    # Without a local GPU the layers stay on the CPU: llama.cpp would give "GPU layers" to the RPC devices.
    return ModelDevices(devices, placement.n_gpu_layers if local else 0,
                        [1.0] + [0.0] * len(handles) if local else None)


def place_across(index: ModelIndex, placement: Placement, options: EngineOptions,
                 profile: Profile) -> tuple[Placement, tuple[str, ...]]:
    """The placement with the expert layers that do not fit this host's budget on options.rpc's servers
    (their free memory asked now), and a note when nothing needed to go there."""
    devices = connect(options.rpc)
    budget = options.host_budget if options.host_budget is not None else psutil.virtual_memory().available
    placed = place_remote(index, placement, devices, budget, profile.ubatch)
    if placed.remote:
        return placed, ()
    return placed, (f"the plan fits the host budget ({budget / 2**30:.2f} GiB): nothing is placed on the RPC "
                    "servers (--host-budget sets a smaller one)",)
