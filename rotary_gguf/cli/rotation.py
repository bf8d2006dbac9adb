"""Commands about expert rotation: `rotary simulate` and `rotary trace synth|show`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rotary_gguf.cli import Failure, main, size_option
from rotary_gguf.rotation import POLICIES


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--slots", type=click.IntRange(min=0), default=None, help="Slots per layer.")
@click.option("--vram", default=None, help="VRAM for slots (e.g. 4GiB): slots per layer from the trace's sizes.")
@click.option("--policy", type=click.Choice([*POLICIES, "all"]), default="all", show_default=True)
@click.option("--budget", default=None,
              help="Bytes that may be copied per token [default: the runtime's, from the profile's PCIe bandwidth].")
@click.option("--profile", "profile_name", default="rtx4060-laptop-8gb", show_default=True,
              help="Bandwidths for the predicted decode speed and the default copy budget.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also draw hit rate against slots per layer for the policies, as a PNG.")
@click.option("--calibration", "calibrated", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A calibrated model (rotary-aware GGUF, or a GGUF with its sidecar): its popularity seeds the "
                   "slots and is hybrid's prior, as at run time.")
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="With a trace that recorded the plugin's predictions: also replay each policy with "
                   "cross-layer prefetch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def simulate(trace_path: Path, slots: int | None, vram: str | None, policy: str, budget: str | None,
             profile_name: str, plot: Path | None, calibrated: Path | None, prefetch: bool, as_json: bool) -> None:
    """Replay TRACE against slots and rotation policies: hit rate, its share of the offline optimum, bytes
    copied, predicted decode speed; with recorded predictions, also with cross-layer prefetch."""
    from rotary_gguf.profile import load_profile
    from rotary_gguf.simulate import plot_curve, simulate_policies, slots_for_vram
    from rotary_gguf.trace import read_trace

    if (slots is None) == (vram is None):
        raise Failure("give exactly one of --slots and --vram")
    trace = read_trace(trace_path)
    profile = load_profile(profile_name)
    k = slots if slots is not None else slots_for_vram(trace, size_option(vram, "--vram"))
    policies = list(POLICIES) if policy == "all" else [policy]
    budget_bytes = size_option(budget, "--budget")
    prior = None
    if calibrated is not None:
        from rotary_gguf.calibration import load_calibration
        from rotary_gguf.gguf import open_index

        calibration, reason = load_calibration(open_index(calibrated))
        if calibration is None:
            raise Failure(f"{calibrated}: no calibration to seed from: {reason}")
        prior = calibration.popularity()
    results = simulate_policies(trace, k, policies, profile, budget_bytes=budget_bytes, prior=prior,
                                prefetch=prefetch)
    kind = "synthetic" if trace.header.synthetic else "recorded"
    if plot:
        plot_curve(trace, policies, profile, plot, budget_bytes)
    if as_json:
        out = {"trace": str(trace_path), "trace_kind": kind, "model": trace.header.model, "profile": profile.name,
               "slots": k, "results": [r.to_json() for r in results]}
        if len(policies) == 1:  # its result as the runtime would run it (with prefetch when simulated)
            out |= results[-1].to_json()
        click.echo(json.dumps(out))
        return
    click.echo(f"{trace_path.name}: {kind} trace of {trace.header.model}, {trace.decode_steps} decoded tokens, "
               f"{len(trace.header.layers)} layers x {trace.header.n_expert} experts; {k} slots per layer; "
               f"bandwidths of {profile.name}")
    click.echo(f"offline optimum: {results[0].optimal_hit_rate:.1%} (immediate admission), "
               f"{results[0].optimal_delayed_hit_rate:.1%} (with the runtime's admission delay)")
    prefetched = [r for r in results if r.prefetch]
    if prefetched:
        click.echo(f"cross-layer predictions: recall {prefetched[0].prediction_recall:.1%} of the selections")
    elif prefetch:
        click.echo("no cross-layer predictions in this trace: prefetch not simulated")
    click.echo(f"{'policy':<17}{'hit rate':>10}{'of optimum':>12}{'no rotation':>13}{'copied/token':>14}"
               f"{'budget':>12}{'pred. tok/s':>13}")
    for r in results:
        click.echo(f"{r.label:<17}{r.hit_rate:>10.1%}{r.share_of_optimal:>12.2f}{r.static_hit_rate:>13.1%}"
                   f"{r.bytes_copied_per_token / 2**20:>10.1f} MiB{(r.budget_bytes or 0) / 2**20:>8.1f} MiB"
                   f"{r.predicted_decode_tok_s:>13.1f}")
    if plot:
        click.echo(f"wrote {plot}")


@main.group()
def trace() -> None:
    """Routing traces (the compact binary format of rotary_gguf/trace.py)."""


@trace.command("synth")
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--layers", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--experts", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--used", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def trace_synth(out: Path, layers: int, experts: int, used: int, requests: int, prompt_tokens: int,
                decode_tokens: int, seed: int, force: bool) -> None:
    """Write a synthetic routing trace (Qwen3-30B-A3B shapes by default) fitted to published locality."""
    from rotary_gguf.trace import synthetic_trace, write_trace

    if used > experts:
        raise Failure(f"--used {used} is more than --experts {experts}")
    if out.exists() and not force:
        raise Failure(f"{out} exists; use --force to overwrite")
    made = synthetic_trace(layers, experts, used, requests=requests, prompt_tokens=prompt_tokens,
                           decode_tokens=decode_tokens, seed=seed)
    click.echo(f"wrote {write_trace(out, made)} (synthetic: {requests} requests x {decode_tokens} decoded tokens)")


@trace.command("show")
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
def trace_show(trace_path: Path) -> None:
    """Print a trace's header and step counts."""
    from rotary_gguf.trace import read_trace

    t = read_trace(trace_path)
    prompts = sum(1 for phase, _ in t.steps if phase == "prompt")
    predicted = sum(1 for step in t.predictions if any(ids.size for ids in step.values()))
    click.echo(json.dumps(t.header.to_json() | {"prompt_steps": prompts, "decode_steps": t.decode_steps,
                                                "steps_with_predictions": predicted}, indent=1))
