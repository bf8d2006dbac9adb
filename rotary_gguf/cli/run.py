"""Commands that plan and run a model: profiles, plan, run, chat, bench."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from rotary_gguf.cli import Failure, LazyBar, main
from rotary_gguf.plan import LAYER_ORDERS, STRATEGIES
from rotary_gguf.report import format_bench, format_dry_run, format_placement, format_profile, format_telemetry
from rotary_gguf.rotation import POLICIES


def _placement_options(func):
    """--profile, --vram-budget and --ctx, shared by every command that plans."""

    @click.option("--profile", "profile_name", default="auto", show_default=True,
                  help="Profile name (see `rotary profiles list`), a YAML file, or auto (detect this machine).")
    @click.option("--vram-budget", default=None, help="VRAM budget such as 6GiB or 6500MiB [default: the profile's].")
    @click.option("--ctx", type=click.IntRange(min=16), default=None, help="Context size [default: the profile's].")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _setup(model: Path, profile_name: str, vram_budget: str | None):
    """Validate the model with the index (before llama.cpp sees it) and resolve profile and budget."""
    from rotary_gguf.gguf import open_index
    from rotary_gguf.profile import load_profile, parse_size

    index = open_index(model)
    profile = load_profile(profile_name)
    budget = None
    if vram_budget is not None:
        try:
            budget = parse_size(vram_budget, "--vram-budget")
        except ValueError as exc:
            raise Failure(str(exc)) from None
    if not index.is_moe:
        click.echo(f"note: {model.name} is a dense model (no routed experts): whole layers go to the GPU",
                   err=True)
    return index, profile, budget


PLACEMENTS = ("auto", *STRATEGIES)


def _usable(strategy: str) -> str:
    """auto: rotary when the scheduler plugin can run here, else layer-fill. rotary that cannot run (no
    GPU, plugin missing or built for another llama-cpp-python) falls back to layer-fill, said in one line."""
    if strategy not in ("auto", "rotary"):
        return strategy
    from rotary_gguf import runtime

    reason = runtime.rotary_unavailable()
    if reason is None:
        return "rotary"
    if strategy == "rotary":
        click.echo(f"note: {reason}; using layer-fill", err=True)
    return "layer-fill"


def _placement_choice(default: str = "auto", **kwargs):
    return click.option("--placement", type=click.Choice(PLACEMENTS), default=default, show_default=True,
                        help="auto: rotary when a GPU and the scheduler plugin are here, else layer-fill.", **kwargs)


def _plan(index, profile, budget, ctx, strategy="layer-fill", layer_order="first"):
    from rotary_gguf.embed import load_calibration
    from rotary_gguf.plan import plan_placement

    calibration = load_calibration(index)[0] if strategy == "rotary" else None
    return plan_placement(index, profile, strategy=strategy, vram_budget=budget, ctx=ctx, layer_order=layer_order,
                          popularity=calibration.popularity() if calibration else None)


@main.group()
def profiles() -> None:
    """Hardware profiles: VRAM budget, context, KV cache type, threads, bandwidth hints."""


@profiles.command("list")
def profiles_list() -> None:
    """List the packaged profiles."""
    from rotary_gguf.profile import load_profile, profile_names

    for name in profile_names():
        p = load_profile(name)
        budget = f"{p.vram_budget_bytes / 2**30:.1f} GiB" if p.has_gpu else "no GPU"
        click.echo(f"{name:<22}{budget:>10}  ctx {p.ctx:<6} {p.description}")


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Show one profile (a packaged name or a YAML path), validated."""
    from rotary_gguf.profile import load_profile

    click.echo(format_profile(load_profile(name)))


@profiles.command("detect")
def profiles_detect() -> None:
    """Detect this machine's GPU (NVML), RAM and cores, and say which profile `auto` picks."""
    from rotary_gguf.profile import detect_profile

    d = detect_profile()
    click.echo(f"GPU            {d.gpu_name or 'none'}"
               + (f" ({d.vram_total_bytes / 2**30:.1f} GiB, {d.vram_free_bytes / 2**30:.1f} GiB free)"
                  if d.gpu_name else ""))
    click.echo(f"host           {d.ram_total_bytes / 2**30:.1f} GiB RAM, {d.physical_cores} physical cores")
    click.echo(f"profile        {d.profile.name}: {d.reason}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@_placement_options
@click.option("--placement", type=click.Choice(STRATEGIES), default="layer-fill", show_default=True)
@click.option("--layer-order", type=click.Choice(LAYER_ORDERS), default="first", show_default=True,
              help="Which layers' experts get VRAM first (last: llama.cpp's --n-cpu-moe order).")
@click.option("--check", is_flag=True,
              help="Also run llama.cpp's dry run (no_alloc) and compare its compute buffers with the plan.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(model: Path, profile_name: str, vram_budget: str | None, ctx: int | None, placement: str,
         layer_order: str, check: bool, as_json: bool) -> None:
    """Plan where MODEL's tensors go under a VRAM budget, before loading anything."""
    from rotary_gguf import runtime
    from rotary_gguf.plan import estimate_decode_tok_s

    index, profile, budget = _setup(model, profile_name, vram_budget)
    result = _plan(index, profile, budget, ctx, placement, layer_order)
    estimate = estimate_decode_tok_s(index, result, profile)
    buffers = runtime.dry_run(model, result, **runtime.context_options(result, profile)) if check else None
    if as_json:
        out = {"model": str(model), **result.to_json(), "estimated_decode_tok_s": round(estimate, 1)}
        if buffers is not None:
            out["dry_run_buffers"] = [{"kind": b.kind, "name": b.name, "bytes": b.nbytes} for b in buffers]
        click.echo(json.dumps(out))
        return
    click.echo(format_placement(index, result, profile, estimate))
    if buffers is not None:
        click.echo(format_dry_run(result, buffers, runtime.gpu_device_name()))


def _load(model: Path, placement, profile, threads: int | None, repack: bool):
    from rotary_gguf import runtime

    loaded = runtime.load(model, placement, **runtime.context_options(placement, profile, threads=threads,
                                                                      repack=repack))
    if loaded.gpu is None and placement.vram_budget_bytes:
        click.echo("note: this llama.cpp build has no GPU backend: everything runs on the CPU "
                   "(`rotary plan` shows where tensors would go)", err=True)
    return loaded


_RUNTIME_OPTIONS = [
    click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: the profile's]."),
    click.option("--repack", is_flag=True, help="Let llama.cpp copy host experts into its CPU repacking buffers."),
]


def _runtime_options(func):
    for option in reversed(_RUNTIME_OPTIONS):
        func = option(func)
    return func


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("prompt")
@_placement_options
@_runtime_options
@click.option("-n", "n_tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temp", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", "as_chat", is_flag=True, help="Send PROMPT as one user turn through the model's chat template.")
@_placement_choice()
def run(model: Path, prompt: str, profile_name: str, vram_budget: str | None, ctx: int | None,
        threads: int | None, repack: bool, n_tokens: int, temp: float, seed: int, as_chat: bool,
        placement: str) -> None:
    """Generate a completion of PROMPT, streamed to stdout (statistics on stderr)."""
    from rotary_gguf import runtime
    from rotary_gguf.chat import template_for

    index, profile, budget = _setup(model, profile_name, vram_budget)
    loaded = _load(model, _plan(index, profile, budget, ctx, _usable(placement)), profile, threads, repack)
    if as_chat:
        prompt = template_for(loaded, index.metadata).render([{"role": "user", "content": prompt}])

    def stream(text: str) -> None:
        click.echo(text, nl=False)

    g = runtime.generate(loaded.llm, prompt, n_tokens, temp=temp, seed=seed, stream=stream,
                         residency=loaded.residency)
    click.echo()
    click.echo(f"[{g.prompt_tokens} prompt tokens at {g.prompt_tokens_per_second:.1f} tok/s, "
               f"{len(g.tokens)} generated at {g.decode_tokens_per_second:.1f} tok/s]", err=True)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@_placement_options
@_runtime_options
@click.option("-n", "max_reply", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest reply, in tokens.")
@click.option("--temp", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--system", default=None, help="A system message for the conversation.")
@_placement_choice()
def chat(model: Path, profile_name: str, vram_budget: str | None, ctx: int | None, threads: int | None,
         repack: bool, max_reply: int, temp: float, seed: int, system: str | None, placement: str) -> None:
    """Chat with MODEL in the terminal, with its own chat template.

    /reset clears the conversation, /stats shows speed and memory, /exit (or Ctrl-D) quits;
    Ctrl-C stops the current reply.
    """
    from rotary_gguf import runtime
    from rotary_gguf.chat import ChatSession, template_for

    index, profile, budget = _setup(model, profile_name, vram_budget)
    placement = _plan(index, profile, budget, ctx, _usable(placement))
    loaded = _load(model, placement, profile, threads, repack)
    session = ChatSession(loaded, template_for(loaded, index.metadata), max_reply_tokens=max_reply, temp=temp,
                          seed=seed, system=system)
    click.echo(f"chatting with {model.name} (ctx {runtime.context_size(loaded.llm)}); /reset /stats /exit; "
               "Ctrl-C stops a reply", err=True)
    _chat_loop(session, placement)


def _chat_loop(session, placement) -> None:
    from rotary_gguf.bench import rotary_stats
    from rotary_gguf.errors import RotaryError

    try:
        import readline  # noqa: F401  (line editing and history for input() in a real terminal)
    except ImportError:
        pass

    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n[Ctrl-C stops a reply; /exit or Ctrl-D quits]")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            click.echo("[conversation cleared]")
            continue
        if command == "/stats":
            rotary = rotary_stats(session.model.residency) if session.model.residency else None
            click.echo(format_telemetry(session.last, session.telemetry(), placement, session.model.rss_before_load,
                                        rotary))
            continue
        try:
            reply = session.send(line, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        except RotaryError as exc:
            click.echo(f"[{exc}]")
            continue
        click.echo()
        if reply.dropped_turns:
            click.echo(f"[context full: dropped the {reply.dropped_turns} oldest turn(s)]")
        if reply.interrupted:
            click.echo("[stopped]")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@_placement_options
@_runtime_options
@click.option("--placement", "only", type=click.Choice(STRATEGIES), default=None,
              help="Run one placement only [default: all; rotary where the scheduler plugin can run].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--tokens", "decode_tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--policy", type=click.Choice(POLICIES), default=None,
              help="Rotary: the slot rotation policy [default: the profile's].")
@click.option("--copy-budget", default=None,
              help="Rotary: bytes rotation may copy per token [default: from the profile's PCIe bandwidth].")
@click.option("--trace", "trace_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Rotary: write the routing the scheduler saw to this trace file.")
@click.option("--replay", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Rotary, benchmarks only: compute the experts of this trace instead of the router's "
                   "(outputs are then not the model's; the results say so).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(model: Path, profile_name: str, vram_budget: str | None, ctx: int | None, threads: int | None,
          repack: bool, only: str | None, prompt_tokens: int, decode_tokens: int, policy: str | None,
          copy_budget: str | None, trace_out: Path | None, replay: Path | None, as_json: bool) -> None:
    """Prompt and decode tok/s, peak VRAM and host RSS of each placement, in this process."""
    from rotary_gguf.bench import RotaryOptions, run_bench
    from rotary_gguf.profile import parse_size

    try:
        budget_bytes = parse_size(copy_budget, "--copy-budget") if copy_budget is not None else None
    except ValueError as exc:
        raise Failure(str(exc)) from None
    rotary = RotaryOptions(policy, budget_bytes, trace_out, replay)

    index, profile, budget = _setup(model, profile_name, vram_budget)
    skipped = {}
    if only:
        strategies = (_usable(only),)
    else:
        from rotary_gguf import runtime

        reason = runtime.rotary_unavailable()
        strategies = tuple(s for s in STRATEGIES if s != "rotary" or reason is None)
        skipped = {"rotary": reason} if reason else {}
    bar = LazyBar("benchmarking")
    try:
        result = run_bench(model, index, profile, strategies=strategies, vram_budget=budget, ctx=ctx,
                           prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, threads=threads,
                           repack=repack, skipped=skipped, rotary=rotary,
                           progress=lambda done, name: bar(done, len(strategies), name))
        bar(len(strategies), len(strategies), "done")
    finally:
        bar.close()
    click.echo(json.dumps(result.to_json()) if as_json else format_bench(result))
