"""Human-readable renderings of library results (the CLI prints these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rotary_gguf.errors import RotaryError
from rotary_gguf.gguf import ModelIndex, TensorClass

_CLASS_LABELS = {
    TensorClass.TOKEN_EMBEDDING: "token embedding",
    TensorClass.OUTPUT_HEAD: "output head",
    TensorClass.ATTENTION: "attention",
    TensorClass.NORM: "norms",
    TensorClass.ROUTER: "routers",
    TensorClass.SHARED_EXPERT: "shared experts",
    TensorClass.ROUTED_EXPERT: "routed experts",
    TensorClass.EXPERT_BIAS: "expert biases/scales",
    TensorClass.DENSE_FFN: "dense FFN",
    TensorClass.OTHER: "other",
}


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_index(index: ModelIndex) -> str:
    """The `rotary inspect` table."""
    p = index.params
    total = sum(index.bytes_by_class.values()) or 1
    lines = [
        f"model          {index.path} ({format_bytes(index.file_size)}"
        + (f" in {len(index.files)} split files)" if len(index.files) > 1 else ")"),
        f"architecture   {p.arch}: {p.n_layer} layers ({len(index.moe_layers)} with routed experts), "
        f"{p.n_expert} experts, {p.n_expert_used} used per token"
        + (f", {p.n_expert_shared} shared" if p.n_expert_shared else ""),
        f"shapes         hidden {p.n_embd}, expert FFN {p.n_ff_exp}"
        + (f", shared-expert FFN {p.n_ff_shexp}" if p.n_ff_shexp else "")
        + f", heads {p.n_head} (KV {p.n_head_kv}, head dim {p.head_dim_k}/{p.head_dim_v}), "
        f"vocab {p.n_vocab}, trained context {p.n_ctx_train}",
        f"tensor types   {', '.join(f'{name} x{n}' for name, n in index.type_counts.items())}",
        f"layer memory   {_layer_memory_summary(index)}",
        "",
        f"{'tensor class':<22}{'bytes':>12}{'share':>8}",
    ]
    for cls in TensorClass:
        n = index.bytes_by_class[cls.value]
        if n:
            lines.append(f"{_CLASS_LABELS[cls]:<22}{format_bytes(n):>12}{n / total:>8.1%}")
    per_proj = "  ".join(f"{proj} {format_bytes(n)}" for proj, n in index.expert_bytes_by_proj.items())
    lines += [
        "",
        f"one expert     {per_proj}  = {format_bytes(index.max_expert_bytes)} (largest layer)",
        f"one token      reads {p.n_expert_used} experts x {len(index.moe_layers)} layers "
        f"= {format_bytes(p.n_expert_used * sum(index.expert_bytes(layer) for layer in index.moe_layers))}",
        f"must be VRAM   {format_bytes(index.vram_resident_bytes)} "
        "(attention, norms, routers, shared experts, output head, other)",
        f"can be host    {format_bytes(index.host_capable_bytes)} (routed experts and their biases, token embedding)",
    ]
    return "\n".join(lines)


def _layer_memory_summary(index: ModelIndex) -> str:
    """Which layers hold a KV cache (and with which window), recurrent or compressor state, or are NextN
    blocks: what llama.cpp allocates per layer besides the weights."""
    memory = index.layer_memory
    kv = [m.layer for m in memory if m.kv_k]
    swa = [m.layer for m in memory if m.kv_k and m.swa_window]
    recurrent = [m.layer for m in memory if m.recurrent_bytes]
    compressed = [m.layer for m in memory if m.compressed]
    parts = [f"KV cache in layers {_layers(kv)}"
             + (f" (sliding window {memory[swa[0]].swa_window} in {_layers(swa)}, full-size cache)" if swa else "")]
    if recurrent:
        parts.append(f"recurrent state in {_layers(recurrent)} "
                     f"({format_bytes(sum(m.recurrent_bytes for m in memory))} per sequence)")
    if compressed:
        parts.append(f"compressed KV and compressor state in {_layers(compressed)} "
                     f"({format_bytes(sum(m.compressor_bytes for m in memory))} per sequence)")
    if index.nextn_layers:
        parts.append(f"NextN/MTP block {_layers(index.nextn_layers)} (not loaded for decoding: no memory, no slots)")
    return "; ".join(parts)


def _layers(layers: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 5) -> '0-2, 5'."""
    runs: list[str] = []
    for layer in sorted(layers):
        if runs and runs[-1].split("-")[-1] == str(layer - 1):
            runs[-1] = f"{runs[-1].split('-')[0]}-{layer}"
        else:
            runs.append(str(layer))
    return ", ".join(runs) or "none"


def _expert_vram_line(p) -> str:
    if p.strategy != "rotary":
        return f"  experts      {format_bytes(p.gpu_expert_bytes):>12}  layers {_layers(p.gpu_expert_layers)}"
    counts = sorted({n for _, n in p.expert_slots}) or [0]
    per_layer = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"  expert slots {format_bytes(p.slot_bytes):>12}  {per_layer} per layer (rotary scheduler); "
            f"~{p.device_read_share:.0%} of expert reads from VRAM "
            + ("(calibration popularity)" if p.calibrated else "(uniform routing; calibrate for better)"))


def format_placement(index: ModelIndex, placement, profile, estimate: float) -> str:
    """The `rotary plan` table."""
    p = placement
    remote = {layer for share in p.remote for layer in share.layers}  # on RPC servers (`plan --rpc` lists them)
    cpu_layers = [layer for layer in index.moe_layers if layer not in p.gpu_expert_layers and layer not in remote]
    lines = [
        f"model          {index.path.name}: {index.params.arch}, {index.params.n_layer} layers, "
        f"{index.params.n_expert} experts ({index.params.n_expert_used} used)" + (" - dense" if p.dense else ""),
        f"profile        {profile.name}: budget {format_bytes(p.vram_budget_bytes)}, ctx {p.ctx}, "
        f"KV {p.kv_cache_type}, placement {p.strategy}",
    ]
    if p.vram_budget_bytes:
        lines += [
            "VRAM",
            f"  weights      {format_bytes(p.gpu_weight_bytes):>12}  attention, norms, routers, shared experts, output",
            f"  KV cache     {format_bytes(p.kv_bytes):>12}  ctx {p.ctx}, {p.kv_cache_type}",
            *([f"  state        {format_bytes(p.state_bytes):>12}  recurrent (conv + SSM) and compressor state"]
              if p.state_bytes else []),
            f"  compute      {format_bytes(p.compute_bytes):>12}  ubatch {profile.ubatch}",
            f"  GPU runtime  {format_bytes(p.overhead_bytes):>12}  CUDA context and pools",
            _expert_vram_line(p),
            f"  total        {format_bytes(p.predicted_vram_bytes):>12}  of {format_bytes(p.vram_budget_bytes)}",
        ]
    else:
        lines.append("VRAM           none: everything runs on the CPU")
    lines += [
        "host RAM",
        f"  weights      {format_bytes(p.host_weight_bytes):>12}  in the mmap"
        + (f"; experts of layers {_layers(cpu_layers)}" if cpu_layers and not p.dense else ""),
        f"  total        {format_bytes(p.predicted_host_bytes):>12}  with compute buffers"
        + ("" if p.vram_budget_bytes else " and KV cache"),
        f"GPU layers     {p.n_gpu_layers} (llama.cpp n_gpu_layers)",
    ]
    lines += [f"override       {o.pattern} -> {o.buffer}" for o in p.overrides] or ["override       none"]
    lines.append(f"estimate       ~{estimate:.0f} tok/s decode if bound by weight reads (profile bandwidths)")
    return "\n".join(lines)


def format_dry_run(placement, buffers, gpu: str | None) -> str:
    """llama.cpp's dry-run compute buffers next to the planner's."""
    host = sum(b.nbytes for b in buffers if b.kind == "compute" and b.on_host)
    device = sum(b.nbytes for b in buffers if b.kind == "compute" and not b.on_host)
    planned_host = placement.host_compute_bytes
    lines = [f"dry run        llama.cpp (no_alloc), {'GPU ' + gpu if gpu else 'CPU-only build'}: compute buffers "
             + ", ".join(f"{b.name} {format_bytes(b.nbytes)}" for b in buffers if b.kind == "compute")]
    if gpu and placement.vram_budget_bytes:
        lines.append(f"  GPU compute  planned {format_bytes(placement.compute_bytes)}, llama.cpp {format_bytes(device)}"
                     + (f" ({placement.compute_bytes / device:.2f}x)" if device else ""))
    elif placement.vram_budget_bytes:
        lines.append("  not comparable: this llama.cpp build has no GPU backend, so it ran the plan on the CPU")
        return "\n".join(lines)
    lines.append(f"  CPU compute  planned {format_bytes(planned_host)}, llama.cpp {format_bytes(host)}"
                 + (f" ({planned_host / host:.2f}x)" if host else ""))
    return "\n".join(lines)


def format_profile(profile) -> str:
    p = profile
    gpu = f"{' | '.join(p.gpu_match)}, {format_bytes(p.vram_total_bytes)}" if p.has_gpu else "none"
    return "\n".join([
        f"name             {p.name}",
        f"description      {p.description}",
        f"file             {p.source}",
        f"GPU              {gpu}",
        f"VRAM budget      {format_bytes(p.vram_budget_bytes)}",
        f"context          {p.ctx} (KV {p.kv_cache_type}), batch {p.batch}, ubatch {p.ubatch}",
        f"threads          {p.threads or 'auto (physical cores)'}, "
        f"flash attention {'on' if p.flash_attention else 'off'}",
        f"bandwidth        GPU {p.gpu_memory_gbs:g} GB/s, host RAM {p.host_ram_gbs:g} GB/s, PCIe {p.pcie_gbs:g} GB/s",
        f"GPU overhead     {format_bytes(p.gpu_overhead_bytes)}",
    ])


def format_rotary_line(r) -> str:
    """One line of the rotary scheduler's counters (a runtime.RotaryStats): `run` on stderr, chat's /stats."""
    now = r.copy_budget_bytes_per_token
    if now:
        budget = f" ({format_bytes(now)}/token now)"
    else:  # None: no token measured yet, or no limit at all
        budget = " (no limit until a token is measured)" if now is None and "token time" in r.copy_budget else ""
    return (f"rotary: {r.hit_rate:.1%} of expert reads from slots ({r.expert_reads_device} device, "
            f"{r.expert_reads_host} host); policy {r.policy}; copy budget {r.copy_budget}{budget}; "
            f"{r.admissions} admitted, {r.evictions} evicted, {format_bytes(r.bytes_copied)} copied, "
            f"copy stalls {r.copy_stall_ms:.1f} ms"
            + (f"; prefetch: {r.prefetches} experts, prediction recall {r.prediction_recall:.0%}, "
               f"waits {r.prefetch_stall_ms:.1f} ms" if r.prefetch else "; prefetch off"))


def format_telemetry(stats, placement) -> str:
    """The `/stats` lines of `rotary chat` (a runtime.EngineStats)."""
    lines = []
    g = stats.last
    if g is not None:
        cached = f" ({g.cached_tokens} reused from the cache)" if g.cached_tokens else ""
        lines.append(f"last reply     {g.prompt_tokens} prompt tokens{cached} at "
                     f"{g.prompt_tokens_per_second:.1f} tok/s, {len(g.tokens)} tokens at "
                     f"{g.decode_tokens_per_second:.1f} tok/s")
    if stats.vram_used_bytes is not None:
        lines.append(f"VRAM           {format_bytes(stats.vram_used_bytes)} used, budget "
                     f"{format_bytes(placement.vram_budget_bytes)}, "
                     f"predicted {format_bytes(placement.predicted_vram_bytes)}")
    else:
        lines.append("VRAM           no NVIDIA GPU")
    lines.append(f"host RSS       {format_bytes(stats.rss_bytes)}; the model added "
                 f"{format_bytes(stats.rss_model_bytes)}, planned {format_bytes(placement.predicted_host_bytes)}")
    if stats.rotary is not None:
        lines.append(f"{'rotary':<15}{format_rotary_line(stats.rotary).removeprefix('rotary: ')}")
    return "\n".join(lines)


def format_mean_sd(value: dict[str, float]) -> str:
    """{"mean", "sd"} (bench's repetitions) as "mean ± sd"."""
    return f"{value['mean']:.1f} ± {value['sd']:.1f}"


def format_bench(result) -> str:
    """The `rotary bench` table: mean ± standard deviation over the repetitions."""
    runs = f"{result.spec.repetitions} run(s) each, interleaved" + (", each in a child process" if result.isolated
                                                                    else "")
    lines = [f"model {result.model.name}, profile {result.profile.name}, VRAM budget "
             f"{format_bytes(result.vram_budget_bytes)}, GPU {result.gpu or 'none (CPU build)'}; {runs}",
             f"{'placement':<18}{'prompt tok/s':>15}{'decode tok/s':>15}{'peak VRAM':>12}{'peak RSS':>12}"
             f"{'RSS delta':>12}  GPU expert layers or rotary hit rate"]
    for r in result.placements:
        vram = format_bytes(r.peak_vram_bytes) if r.peak_vram_bytes is not None else "-"
        lines.append(f"{r.name:<18}{format_mean_sd(r.prompt_tok_s):>15}{format_mean_sd(r.decode_tok_s):>15}{vram:>12}"
                     f"{format_bytes(r.peak_rss_bytes):>12}{format_bytes(r.rss_delta_bytes):>12}  "
                     + (f"{r.rotary['hit_rate']:.1%} of expert reads from slots, policy {r.rotary['policy']}"
                        if r.rotary else _layers(r.placement.gpu_expert_layers)))
    retained = [(r.name, r.rss_retained_bytes) for r in result.placements if r.rss_retained_bytes > 64 * 2**20]
    lines += [f"(warning: {name} still held {format_bytes(n)} of RSS after it was closed; use --isolate)"
              for name, n in retained]
    if not result.vram_budget_bytes:
        lines.append("(no VRAM budget: every placement runs entirely on the CPU, experts from the mmap)")
    lines += [f"({name} not run: {reason})" for name, reason in result.skipped.items()]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, for --plot (matplotlib is the optional `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RotaryError("--plot needs matplotlib: pip install 'rotary-gguf[plot]'") from None
    return plt


def save_png(figure: Any, out: Path) -> Path:
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    pyplot().close(figure)
    return out
