"""Human-readable renderings of library results (the CLI prints these)."""

from __future__ import annotations

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
        f"model          {index.path} ({format_bytes(index.file_size)})",
        f"architecture   {p.arch}: {p.n_layer} layers ({len(index.moe_layers)} with routed experts), "
        f"{p.n_expert} experts, {p.n_expert_used} used per token"
        + (f", {p.n_expert_shared} shared" if p.n_expert_shared else ""),
        f"shapes         hidden {p.n_embd}, expert FFN {p.n_ff_exp}"
        + (f", shared-expert FFN {p.n_ff_shexp}" if p.n_ff_shexp else "")
        + f", heads {p.n_head} (KV {p.n_head_kv}, head dim {p.head_dim_k}/{p.head_dim_v}), "
        f"vocab {p.n_vocab}, trained context {p.n_ctx_train}",
        f"tensor types   {_types(index)}",
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


def _types(index: ModelIndex) -> str:
    counts: dict[str, int] = {}
    for t in index.tensors:
        counts[t.type.name] = counts.get(t.type.name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
