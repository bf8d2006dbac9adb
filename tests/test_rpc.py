"""A model across hosts with llama.cpp's RPC backend, on loopback: two `rotary rpc-server` processes (llama.cpp's
rpc-server, built once into the rotary cache) each exposing a CPU device with a memory limit; the `small` model
over a host budget it does not fit placed across them, greedy outputs equal to a single-host run, a server
killed mid-generation, wrong endpoints refused before loading."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from rotary_gguf.cache import cache_dir
from rotary_gguf.cli import main
from rotary_gguf.rpc import Endpoint, RpcError, parse_endpoints
from rotary_gguf.rpc_server import exposure_warning
from rotary_gguf.runtime import EngineOptions, Sampling
from rotary_gguf.runtime.rpc import PROBE_TIMEOUT_S, probe, rpc_unavailable

ROOT = Path(__file__).resolve().parents[1]
# The cache before conftest points ROTARY_CACHE at the session's folder (module import comes first): the
# rpc-server is built there once, not once per session.
_USER_CACHE = cache_dir()
_NO_RPC = rpc_unavailable()
needs_rpc = pytest.mark.skipif(_NO_RPC is not None, reason=f"no RPC backend: {_NO_RPC}")
MIB = 2**20
SERVER_MEM = 64 * MIB  # each server's device: 4 of the small model's 10.1 MiB expert layers after its compute
HOST_BUDGET = 100 * MIB  # the small model needs ~160 MiB on the host at ctx 512: 6 layers must go


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_env() -> dict[str, str]:
    return {**os.environ, "ROTARY_CACHE": str(_USER_CACHE)}


@pytest.fixture(scope="session")
def rpc_server_built() -> Path:
    """`rotary rpc-server --build-only`: compiled on first use into the user's rotary cache, then reused."""
    done = subprocess.run([sys.executable, "-m", "rotary_gguf", "rpc-server", "--build-only"], capture_output=True,
                          text=True, env=_cache_env(), timeout=900)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


@contextlib.contextmanager
def _server(mem: int = SERVER_MEM) -> Iterator[tuple[Endpoint, subprocess.Popen]]:
    """`rotary rpc-server --port P --mem MEM` on 127.0.0.1 until the block ends (then stopped and reaped)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rotary_gguf", "rpc-server", "--port", str(port), "--mem",
                             str(mem), "--threads", "1"], env=_cache_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    endpoint = Endpoint("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                probe(endpoint, timeout=2)
                break
            except RpcError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"rpc-server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        yield endpoint, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.fixture(scope="module")
def two_servers(rpc_server_built: Path) -> Iterator[tuple[Endpoint, Endpoint]]:
    with _server() as (a, _), _server() as (b, _):
        yield a, b


def _rpc(endpoints: tuple[Endpoint, ...]) -> str:
    return ",".join(map(str, endpoints))


# Bad input, refused before anything is loaded.

@pytest.mark.parametrize("text", ["localhost", "127.0.0.1:", "127.0.0.1:70000", "a b:1", "h:1,h:1", "[::1]:50052"])
def test_malformed_endpoints_are_one_line(text: str, small_model: Path) -> None:
    done = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--rpc", text])
    assert done.exit_code == 2
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rotary: error: --rpc"), done.output


@needs_rpc
def test_wrong_port_is_refused_before_loading(small_model: Path) -> None:
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rotary_gguf", "run", str(small_model), "hi", "--profile",
                           "cpu-only", "--rpc", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"rotary: error: cannot reach the RPC server 127.0.0.1:{port}: Connection refused; start one there with "
        f"`rotary rpc-server --port {port}`"]
    assert done.stdout == ""
    assert time.monotonic() - started < 60


@needs_rpc
def test_a_server_that_does_not_answer_is_refused_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers a hello
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(RpcError, match="did not answer within 1 s"):
            probe(Endpoint("127.0.0.1", silent.getsockname()[1]), timeout=1)
        assert time.monotonic() - started < PROBE_TIMEOUT_S + 1


def test_rpc_server_warns_beyond_loopback() -> None:
    assert exposure_warning("127.0.0.1") is None
    warning = exposure_warning("0.0.0.0")
    assert warning and "no authentication" in warning and "SSH tunnel" in warning


# Placement across the servers.

def test_place_remote_moves_the_last_layers_onto_devices_in_order(small_model: Path) -> None:
    from rotary_gguf.gguf import open_index
    from rotary_gguf.plan import plan_placement
    from rotary_gguf.profile import load_profile
    from rotary_gguf.rpc import (
        Link,
        RemoteDevice,
        layer_network_bytes,
        network_estimate,
        place_remote,
        remote_network_bytes,
    )

    index = open_index(small_model)
    local = plan_placement(index, load_profile("cpu-only"), ctx=512)
    devices = (RemoteDevice(Endpoint("a", 1), 0, SERVER_MEM, SERVER_MEM), RemoteDevice(Endpoint("b", 2), 0, SERVER_MEM,
                                                                                      SERVER_MEM))
    assert place_remote(index, local, devices, local.predicted_host_bytes, 512) == local  # it fits: nothing moves
    placed = place_remote(index, local, devices, HOST_BUDGET, 512)
    assert [(s.buffer, s.layers) for s in placed.remote] == [("RPC0[a:1]", (8, 9, 10, 11)), ("RPC0[b:2]", (6, 7))]
    assert placed.predicted_host_bytes <= HOST_BUDGET
    assert placed.host_weight_bytes == local.host_weight_bytes - sum(s.weight_bytes for s in placed.remote)
    assert [o.buffer for o in placed.overrides] == ["RPC0[a:1]", "RPC0[b:2]", "CPU"]
    assert placed.overrides[0].pattern.startswith(r"^blk\.(8|9|10|11)\.")
    # The ancestry of the graph rides with the first remote layer (6, on b); a one-layer device re-runs its graph.
    per_layer = layer_network_bytes(index)
    assert remote_network_bytes(index, placed) == {"RPC0[a:1]": 4 * per_layer,
                                                   "RPC0[b:2]": 2 * per_layer + 6 * 55 * 296}
    single = place_remote(index, local, devices[:1], local.predicted_host_bytes - 10 * 2**20, 512)
    assert [s.layers for s in single.remote] == [(11,)]
    assert remote_network_bytes(index, single)["RPC0[a:1]"] < per_layer / 2
    net = network_estimate(index, placed, 100.0, Link(gbs=1.0, latency_us=50))
    assert net.round_trips_per_token == 6
    assert net.seconds_per_token == pytest.approx(6 * 50e-6 + net.bytes_per_token / 1e9)
    assert net.predicted_tok_s == pytest.approx(1 / (0.01 + net.seconds_per_token))

@needs_rpc
def test_plan_places_expert_layers_across_both_servers(two_servers, small_model: Path) -> None:
    done = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--ctx", "512", "--rpc",
                                     _rpc(two_servers), "--host-budget", f"{HOST_BUDGET}B", "--json"])
    assert done.exit_code == 0, done.output
    import json

    plan = json.loads(done.output.strip().splitlines()[-1])
    remote = plan["remote"]
    assert [r["buffer"] for r in remote] == [f"RPC0[{two_servers[0]}]", f"RPC0[{two_servers[1]}]"]
    assert all(r["free_bytes"] == SERVER_MEM for r in remote)
    assert all(r["weight_bytes"] + r["compute_bytes"] <= SERVER_MEM for r in remote)
    layers = sorted(layer for r in remote for layer in r["layers"])
    assert layers == list(range(12 - len(layers), 12)) and len(layers) == 6  # the last layers go
    assert plan["predicted_host_bytes"] <= HOST_BUDGET
    assert plan["cpu_expert_layers"] == list(range(6))
    assert plan["network"]["round_trips_per_token"] == 6 and plan["network"]["bytes_per_token"] > 6 * 2 * 768 * 4
    text = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--ctx", "512", "--rpc",
                                     _rpc(two_servers), "--host-budget", f"{HOST_BUDGET}B"]).output
    assert f"RPC0[{two_servers[1]}]" in text and "per token in 6 round trips" in text


@needs_rpc
def test_greedy_output_across_hosts_equals_a_single_host(two_servers, small_model: Path, open_engine) -> None:
    prompt = list(range(10, 42))
    # One client thread: on a small shared machine spinning OpenMP threads starve the servers' (docs/rpc.md).
    local = open_engine(small_model, "cpu-only", "layer-fill", ctx=512, threads=1)
    expected = local.complete(prompt, 24, sampling=Sampling(temp=0), ignore_eos=True).tokens
    local.close()
    across = open_engine(small_model, "cpu-only", "layer-fill", ctx=512, threads=1, rpc=two_servers,
                         host_budget=HOST_BUDGET)
    assert len(across.placement.remote) == 2
    remote_model = [b for b in across.buffers if b.kind == "model" and b.name.startswith("RPC")]
    assert sorted(b.name for b in remote_model) == sorted(s.buffer for s in across.placement.remote)
    for share in across.placement.remote:  # llama.cpp's own report of what it put there
        (buffer,) = [b for b in remote_model if b.name == share.buffer]
        assert abs(buffer.nbytes - share.weight_bytes) <= 0.01 * MIB * len(share.layers)
    assert across.complete(prompt, 24, sampling=Sampling(temp=0), ignore_eos=True).tokens == expected


@needs_rpc
def test_rotary_placement_is_refused_with_rpc(two_servers, small_model: Path) -> None:
    done = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "rtx4060-laptop-8gb", "--placement",
                                     "rotary", "--rpc", _rpc(two_servers)])
    assert done.exit_code == 2
    assert done.output.strip() == ("rotary: error: --placement rotary cannot use --rpc: the scheduler plugin "
                                   "computes only experts in host memory, so experts on an RPC server would bypass "
                                   "its slots; use layer-fill or experts-on-host")


@needs_rpc
def test_more_than_the_servers_hold_is_refused(two_servers, small_model: Path) -> None:
    done = CliRunner().invoke(main, ["plan", str(small_model), "--profile", "cpu-only", "--ctx", "512", "--rpc",
                                     _rpc(two_servers), "--host-budget", "10MiB"])
    assert done.exit_code == 2
    assert "after filling 2 RPC device(s)" in done.output and "add an RPC server" in done.output


_GENERATE = """
import sys
from rotary_gguf.rpc import parse_endpoints
from rotary_gguf.runtime import Engine, EngineOptions, Sampling
options = EngineOptions(ctx=1024, threads=1, rpc=parse_endpoints(sys.argv[2]), host_budget=int(sys.argv[3]))
engine = Engine.open(sys.argv[1], "cpu-only", "layer-fill", options)
for i, _ in enumerate(engine.generate(list(range(10, 20)), 1000, sampling=Sampling(temp=0), ignore_eos=True)):
    if i == 3:
        print("generating", flush=True)
print("finished", flush=True)
"""


@needs_rpc
def test_a_server_killed_mid_generation_is_one_clear_error(rpc_server_built: Path, small_model: Path) -> None:
    with _server() as (a, _), _server() as (b, victim):
        client = subprocess.Popen([sys.executable, "-c", _GENERATE, str(small_model), _rpc((a, b)),
                                   str(HOST_BUDGET)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "generating"
            victim.kill()
            out, err = client.communicate(timeout=60)  # a hang fails here
        finally:
            client.kill()
    assert client.returncode == 2
    assert "finished" not in out
    assert err.strip().splitlines() == [
        "rotary: error: llama.cpp stopped: an RPC server went away or answered garbage; "
        + err.strip().split("answered garbage; ", 1)[1]]
    assert "RPC server crashed" in err


def test_setup_env_builds_the_rpc_backend_unless_told_not_to(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup_env.sh", tmp_path / "scripts" / "setup_env.sh")

    def which(**env: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k not in ("ROTARY_RPC", "ROTARY_CUDA")} | env
        return subprocess.run(["bash", str(tmp_path / "scripts" / "setup_env.sh"), "--which-build"],
                              capture_output=True, text=True, env={**environ, "ROTARY_CUDA": "0"}, timeout=60)

    assert "RPC backend on" in which().stderr
    assert "RPC backend off" in which(ROTARY_RPC="0").stderr
    bad = which(ROTARY_RPC="yes")
    assert bad.returncode == 2 and "ROTARY_RPC=yes: expected 1" in bad.stderr


def test_endpoints_parse() -> None:
    assert parse_endpoints("127.0.0.1:50052, box.lan:1") == (Endpoint("127.0.0.1", 50052), Endpoint("box.lan", 1))
    assert EngineOptions(rpc=parse_endpoints("h:2")).to_json()["rpc"] == ["h:2"]
