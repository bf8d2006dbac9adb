"""Commands that plan and run a model: profiles, plan, run, chat, bench."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from rotary_gguf.cli import LazyBar, main, size_option
from rotary_gguf.cli.rpc import RPC_OPTIONS, format_hosts, rpc_fields
from rotary_gguf.plan import LAYER_ORDERS, STRATEGIES
from rotary_gguf.report import (
    format_bench,
    format_dry_run,
    format_placement,
    format_profile,
    format_rotary_line,
    format_telemetry,
)
from rotary_gguf.rotation import POLICIES

PLACEMENTS = ("auto", *STRATEGIES)


_PLAN_OPTIONS = [
    click.option("--profile", "profile_name", default="auto", show_default=True,
                 help="Profile name (see `rotary profiles list`), a YAML file, or auto (detect this machine)."),
    click.option("--vram-budget", default=None, help="VRAM budget such as 6GiB or 6500MiB [default: the profile's]."),
    click.option("--ctx", type=click.IntRange(min=16), default=None, help="Context size [default: the profile's]."),
    *RPC_OPTIONS,
]
_RUN_OPTIONS = [
    click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: the profile's]."),
    click.option("--repack", is_flag=True, help="Let llama.cpp copy host experts into its CPU repacking buffers."),
    click.option("--policy", type=click.Choice(POLICIES), default=None,
                 help="Rotary: the slot rotation policy [default: the profile's]."),
    click.option("--prefetch/--no-prefetch", default=True, show_default=True,
                 help="Rotary: copy the experts each layer is predicted to select, one MoE layer ahead."),
    click.option("--copy-budget", default=None,
                 help="Rotary: bytes rotation may copy per token, e.g. 64MiB [default: from the profile's PCIe "
                      "bandwidth and the measured token time]."),
]


def _with(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _model_options(func):
    """Every option that decides how a model is opened; the command receives one EngineOptions as `options`
    (built here, in one place) plus `profile_name`."""

    @_with(_PLAN_OPTIONS + _RUN_OPTIONS)
    @functools.wraps(func)
    def wrapper(*args, vram_budget, ctx, rpc, host_budget, threads, repack, policy, prefetch, copy_budget, **kwargs):
        from rotary_gguf.runtime import EngineOptions

        options = EngineOptions(ctx=ctx, threads=threads, repack=repack, policy=policy, prefetch=prefetch,
                                vram_budget=size_option(vram_budget, "--vram-budget"),
                                copy_budget=size_option(copy_budget, "--copy-budget"), **rpc_fields(rpc, host_budget))
        return func(*args, options=options, **kwargs)

    return wrapper


def _placement_choice(default: str = "auto"):
    return click.option("--placement", type=click.Choice(PLACEMENTS), default=default, show_default=True,
                        help="auto: rotary when a GPU and the scheduler plugin are here, else layer-fill.")


def _open(model: Path, profile_name: str, placement: str, options):
    """The engine, with its notes (fallbacks, no GPU, dense model) said on stderr."""
    from rotary_gguf.runtime import Engine

    engine = Engine.open(model, profile_name, placement, options)
    for note in engine.notes:
        click.echo(f"note: {note}", err=True)
    return engine


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
@_with(_PLAN_OPTIONS)
@click.option("--placement", type=click.Choice(("auto", *STRATEGIES)), default="layer-fill", show_default=True,
              help="auto: the placement the cost model predicts to decode fastest (docs/planner.md).")
@click.option("--layer-order", type=click.Choice(LAYER_ORDERS), default="first", show_default=True,
              help="Which layers' experts get VRAM first (last: llama.cpp's --n-cpu-moe order).")
@click.option("--check", is_flag=True,
              help="Also run llama.cpp's dry run (no_alloc) and compare its compute buffers with the plan.")
@click.option("--link-gbs", type=click.FloatRange(min=0, min_open=True), default=1.25, show_default=True,
              help="With --rpc: the network's bandwidth in GB/s, for the predicted speed (1.25: 10 Gbit/s).")
@click.option("--link-latency-us", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="With --rpc: one round trip to a server, in microseconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(model: Path, profile_name: str, vram_budget: str | None, ctx: int | None, rpc: str | None,
         host_budget: str | None, placement: str, layer_order: str, check: bool, link_gbs: float,
         link_latency_us: float, as_json: bool) -> None:
    """Plan where MODEL's tensors go under a VRAM budget, before loading anything."""
    from dataclasses import replace

    from rotary_gguf.cost import candidates, choose
    from rotary_gguf.plan import estimate_decode_tok_s, plan_placement
    from rotary_gguf.rpc import Link, network_estimate
    from rotary_gguf.runtime import EngineOptions, dry_run, gpu_device_name, prepare

    options = EngineOptions(ctx=ctx, vram_budget=size_option(vram_budget, "--vram-budget"), layer_order=layer_order,
                            **rpc_fields(rpc, host_budget))
    setup = prepare(model, profile_name, "layer-fill" if placement == "auto" else placement, options,
                    runnable=False)
    popularity = setup.calibration.popularity() if setup.calibration else None
    predicted = candidates(setup.index, setup.profile, vram_budget=options.vram_budget, ctx=ctx,
                           layer_order=layer_order, popularity=popularity) if setup.index.is_moe else ()
    notes = setup.notes
    if placement == "auto" and options.rpc:  # the remote part is planned on layer-fill (rotary refuses --rpc)
        notes = setup.notes + ("auto: layer-fill (placing experts on RPC servers)",)
    elif placement == "auto":  # the same index, profile and calibration, planned for the chosen strategy
        chosen, why = choose(predicted) if predicted else ("layer-fill", "auto: layer-fill (a dense model)")
        chosen_plan = plan_placement(setup.index, setup.profile, strategy=chosen, vram_budget=options.vram_budget,
                                     ctx=ctx, layer_order=layer_order,
                                     popularity=popularity if chosen == "rotary" else None)
        setup = replace(setup, placement=chosen_plan)
        notes = setup.notes + (why,)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    estimate = estimate_decode_tok_s(setup.index, setup.placement, setup.profile)
    network = network_estimate(setup.index, setup.placement, estimate, Link(link_gbs, link_latency_us))
    buffers = dry_run(model, setup.placement, setup.options) if check else None
    if as_json:
        out = {"model": str(model), **setup.placement.to_json(), "estimated_decode_tok_s": round(estimate, 1),
               "candidates": [c.to_json() for c in predicted]}
        if options.rpc:
            out["network"] = {"bytes_per_token": network.bytes_per_token, "link_gbs": link_gbs,
                              "round_trips_per_token": network.round_trips_per_token,
                              "link_latency_us": link_latency_us,
                              "predicted_decode_tok_s": round(network.predicted_tok_s, 1)}
        if buffers is not None:
            out["dry_run_buffers"] = [{"kind": b.kind, "name": b.name, "bytes": b.nbytes} for b in buffers]
        click.echo(json.dumps(out))
        return
    click.echo(format_placement(setup.index, setup.placement, setup.profile, estimate))
    if options.rpc:
        click.echo(format_hosts(setup.index, setup.placement, network, Link(link_gbs, link_latency_us)))
    if buffers is not None:
        click.echo(format_dry_run(setup.placement, buffers, gpu_device_name()))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("prompt")
@_model_options
@click.option("-n", "n_tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temp", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", "as_chat", is_flag=True, help="Send PROMPT as one user turn through the model's chat template.")
@_placement_choice()
def run(model: Path, prompt: str, profile_name: str, options, n_tokens: int, temp: float, seed: int, as_chat: bool,
        placement: str) -> None:
    """Generate a completion of PROMPT, streamed to stdout (statistics on stderr)."""
    from rotary_gguf.runtime import Sampling

    with _open(model, profile_name, placement, options) as engine:
        if as_chat:
            prompt = engine.render_chat([{"role": "user", "content": prompt}])
        stream = engine.generate(prompt, n_tokens, sampling=Sampling(temp=temp, seed=seed))
        try:
            for piece in stream:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            stream.close()
        g = stream.result
        click.echo()
        click.echo(f"[{g.prompt_tokens} prompt tokens at {g.prompt_tokens_per_second:.1f} tok/s, "
                   f"{len(g.tokens)} generated at {g.decode_tokens_per_second:.1f} tok/s"
                   + (", stopped" if g.interrupted else "") + "]", err=True)
        rotary = engine.rotary_stats()
        if rotary is not None:
            click.echo(f"[{format_rotary_line(rotary)}]", err=True)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@_model_options
@click.option("-n", "max_reply", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest reply, in tokens.")
@click.option("--temp", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--system", default=None, help="A system message for the conversation.")
@_placement_choice()
def chat(model: Path, profile_name: str, options, max_reply: int, temp: float, seed: int, system: str | None,
         placement: str) -> None:
    """Chat with MODEL in the terminal, with its own chat template.

    /reset clears the conversation, /stats shows speed and memory, /exit (or Ctrl-D) quits;
    Ctrl-C stops the current reply.
    """
    from rotary_gguf.chat import ChatSession

    with _open(model, profile_name, placement, options) as engine:
        session = ChatSession(engine, max_reply_tokens=max_reply, temp=temp, seed=seed, system=system)
        click.echo(f"chatting with {model.name} (ctx {engine.context_size}); /reset /stats /exit; "
                   "Ctrl-C stops a reply", err=True)
        _chat_loop(session)


def _chat_loop(session) -> None:
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
            click.echo(format_telemetry(session.engine.stats(), session.engine.placement))
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
@_model_options
@click.option("--placement", "only", type=click.Choice(STRATEGIES), default=None,
              help="Run one placement only [default: all; rotary where the scheduler plugin can run].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--tokens", "decode_tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of each placement, interleaved across placements (mean and spread reported).")
@click.option("--isolate/--no-isolate", default=None,
              help="Run each placement in a child process [default: when the model is over half the RAM].")
@click.option("--trace", "trace_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Rotary: write the routing the scheduler saw (first repetition) to this trace file.")
@click.option("--replay", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Rotary, benchmarks only: compute the experts of this trace instead of the router's "
                   "(outputs are then not the model's; the results say so).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(model: Path, profile_name: str, options, only: str | None, prompt_tokens: int, decode_tokens: int,
          repetitions: int, isolate: bool | None, trace_out: Path | None, replay: Path | None, as_json: bool) -> None:
    """Prompt and decode tok/s, peak VRAM and host RSS of each placement, like llama-bench: repetitions
    interleaved across placements after a warm-up, each placement's memory released before the next."""
    from dataclasses import replace

    from rotary_gguf.bench import BenchSpec, run_bench
    from rotary_gguf.runtime import rotary_unavailable

    options = replace(options, trace=trace_out, replay=replay, trace_description="rotary bench")
    reason = "rotary does not place experts on RPC servers" if options.rpc else rotary_unavailable()
    if only:
        strategies = (only if only != "rotary" or reason is None else "layer-fill",)
        if only == "rotary" and reason:
            click.echo(f"note: {reason}; using layer-fill", err=True)
        skipped = {}
    else:
        strategies = tuple(s for s in STRATEGIES if s != "rotary" or reason is None)
        skipped = {"rotary": reason} if reason else {}
    spec = BenchSpec(strategies, prompt_tokens, decode_tokens, repetitions, isolate)
    bar = LazyBar("benchmarking")
    try:
        result = run_bench(model, profile_name, options, spec, skipped=skipped, progress=bar)
    finally:
        bar.close()
    click.echo(json.dumps(result.to_json()) if as_json else format_bench(result))
