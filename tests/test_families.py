"""The newer MoE families the pinned llama.cpp runs, from tiny checkpoints converted by llama.cpp's own
convert_hf_to_gguf.py: sessions on memory that cannot drop a suffix (qwen35moe's Gated DeltaNet layers)."""

from __future__ import annotations

from click.testing import CliRunner

from rotary_gguf.chat import ChatSession
from rotary_gguf.cli import main
from rotary_gguf.runtime import Sampling
from rotary_gguf.runtime.generation import can_trim

QWEN35 = "qwen3_5_moe_text"


def test_hybrid_chat_turns_equal_fresh_evaluations(family_models, open_engine):
    """Five turns, one of them regenerated with another message: every reply equals a fresh evaluation of
    the same conversation, and the turns after the first reuse the previous prompt's checkpoint."""
    path = family_models(QWEN35)
    engine = open_engine(path, ctx=1024)
    assert not can_trim(engine._llm)  # hybrid memory: llama.cpp cannot drop the end of it
    fresh = open_engine(path, ctx=1024)
    session = ChatSession(engine, max_reply_tokens=16, temp=0)
    reused = []
    for turn, message in enumerate(["hello there", "and then?", "tell me more", "say it again", "thanks"]):
        if turn == 3:
            del session.messages[-2:]  # regenerate the third turn with another message
        reply = session.send(message, lambda text: None)
        prompt = fresh.tokenize(session.template.render(session.messages[:-1]))
        expected = fresh.complete(prompt, 16, sampling=Sampling(temp=0))
        assert reply.text == expected.text, turn
        reused.append(reply.generation.cached_tokens)
    assert reused[0] == 0 and all(n > 0 for n in reused[1:3]) and reused[4] > 0


def test_hybrid_chat_cli_takes_many_turns(family_models):
    path = family_models(QWEN35)
    result = CliRunner().invoke(main, ["chat", str(path), "--profile", "cpu-only", "--ctx", "512", "-n", "8",
                                       "--temp", "0"], input="hi\nand then?\nmore\n/stats\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "reused from the cache" in result.output
