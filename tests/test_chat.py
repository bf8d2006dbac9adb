"""`rotary chat` in a real pseudo-terminal (pexpect), and its template sandbox."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rotary_gguf.synth import PRESETS, synth_model
from rotary_gguf.template import ChatTemplate, TemplateError

pexpect = pytest.importorskip("pexpect")
ROTARY = str(Path(sys.executable).parent / "rotary")


def _spawn(model: Path, *args: str, profile: str = "cpu-only", env: dict | None = None) -> pexpect.spawn:
    child = pexpect.spawn(ROTARY, ["chat", str(model), "--profile", profile, *args], encoding="utf-8",
                          timeout=60, dimensions=(40, 160), env=env)
    child.expect("> ")
    return child


def test_chat_turns_stats_reset_exit(tiny_model):
    child = _spawn(tiny_model, "-n", "24")
    child.sendline("Hello, which experts are hot today?")
    child.expect("> ")
    child.sendline("/stats")
    child.expect(r"last reply +\d+ prompt tokens at [0-9.]+ tok/s, \d+ tokens at [0-9.]+ tok/s")
    child.expect("VRAM +no NVIDIA GPU")
    child.expect(r"host RSS +[0-9.]+ MiB; the model added [0-9.]+ MiB, planned [0-9.]+ MiB")
    child.expect("> ")
    child.sendline("/reset")
    child.expect(r"\[conversation cleared\]")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_stats_show_rotation(tiny_model, slot_budget):
    import os

    budget = slot_budget(tiny_model, 3)  # 3 of the 8 experts of each layer
    env = {**os.environ, "ROTARY_SCHED_DEVICE": "cpu"}
    child = _spawn(tiny_model, "-n", "24", "--placement", "rotary", "--vram-budget", f"{budget}B", "--ctx", "256",
                   "--policy", "lru", profile="rtx4060-laptop-8gb", env=env)
    child.sendline("Hello, which experts are hot today?")
    child.expect("> ")
    child.sendline("/stats")
    # The policy asked for and the profile's PCIe bandwidth (12 GB/s) reach the rotation.
    child.expect(r"rotary +[0-9.]+% of expert reads from slots \(\d+ device, \d+ host\); policy lru; copy budget "
                 r"0.5 x PCIe 12 GB/s x measured token time \([0-9.]+ \w+/token now\); \d+ admitted, \d+ evicted, "
                 r"[0-9.]+ \w+ copied, copy stalls [0-9.]+ ms")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def _interrupt_a_reply(child, message: str) -> bool:
    """Send a message, press Ctrl-C once the reply streams; True if it stopped the reply (a random model
    may also end its reply by itself first, and then the Ctrl-C lands at the prompt)."""
    child.sendline(message)
    child.expect_exact(message)
    child.expect(r"\S{4}")  # the reply has started streaming
    child.sendintr()
    stopped = child.expect([r"\[stopped\]\r\n> ", r"/exit or Ctrl-D quits\]\r\n> "]) == 0
    return stopped


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(small_model):
    child = _spawn(small_model, "-n", "2000", "--ctx", "2048", "--seed", "1")
    messages = ["Tell me a long story about routers, experts and caches.", "And then?", "Go on, at length."]
    stopped = [_interrupt_a_reply(child, m) for m in messages]
    assert stopped.count(True) >= 2  # and the conversation goes on after an interrupted reply
    child.sendintr()  # Ctrl-C at the prompt explains how to quit and stays
    child.expect("/exit or Ctrl-D quits")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_full_drops_old_turns(tiny_model):
    child = _spawn(tiny_model, "--ctx", "160", "-n", "16")
    long_message = "route this token to the experts that the cache holds " * 4
    dropped = False
    for _ in range(6):
        child.sendline(long_message)
        index = child.expect([r"\[context full: dropped the \d+ oldest turn", "> "])
        if index == 0:
            dropped = True
            child.expect("> ")
    assert dropped
    child.sendline("/exit")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{% for m in messages %}{{ raise_exception('no system role') }}{% endfor %}", "no system role"),
    ("{% for m in messages %}", "does not compile"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "did not finish rendering"),
])
def test_hostile_template_is_one_line_exit_2(tmp_path, template, message):
    path = synth_model(tmp_path / "hostile.gguf", PRESETS["tiny"], "f32", chat_template=template).path
    child = pexpect.spawn(ROTARY, ["chat", str(path), "--profile", "cpu-only"], encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before.strip().splitlines()
    assert child.exitstatus == 2
    assert len(out) == 1 and out[0].startswith("rotary: error:") and message in out[0]


def test_missing_template_is_an_error(tmp_path):
    path = synth_model(tmp_path / "none.gguf", PRESETS["tiny"], "f32", chat_template="").path
    child = pexpect.spawn(ROTARY, ["chat", str(path), "--profile", "cpu-only"], encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "no chat template" in child.before


def test_template_renders_chatml():
    from rotary_gguf.synth.vocab import CHAT_TEMPLATE

    t = ChatTemplate(CHAT_TEMPLATE, "", "<|im_end|>")
    text = t.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "", "").render([])
