"""`rotary perplexity` against a direct computation from llama.cpp's logits, window by window as
perplexity.cpp's loops take them (llama_cpp.Llama with logits_all, numpy log-softmax in float64)."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from rotary_gguf.cli import main
from rotary_gguf.perplexity import PerplexityError, perplexity, text_perplexity, windows
from rotary_gguf.runtime import Engine

CTX = 32
WORDS = ("the river valley begins with glaciers that carved it and farmers who followed them north when the ice "
         "withdrew <|im_end|> def merge(a, b): return sorted(a + b) 12 345").split()


@pytest.fixture(scope="module")
def text() -> str:
    """About 300 tokens of the tiny vocabulary, with a special token's text that must stay plain text."""
    rng = random.Random(7)
    return " ".join(rng.choice(WORDS) for _ in range(120))


@pytest.fixture(scope="module")
def bos_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with tokenizer.ggml.add_bos_token set: every window starts with BOS."""
    path = tmp_path_factory.mktemp("bos") / "tiny-bos.gguf"
    shutil.copy(tiny_model, path)
    field = GGUFReader(path, "r+").fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True
    return path


def _reference(engine: Engine, text: str, ctx: int, stride: int | None) -> np.ndarray:
    """Per-token NLL of perplexity.cpp's windows, from a separate llama.cpp context that keeps every logit
    (attention as the engine's: flash attention alone moves logits by ~1e-3)."""
    llm = llama_cpp.Llama(model_path=str(engine.path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False,
                          flash_attn=engine.options.flash_attention)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        bos = llm.token_bos() if llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)) else None
        if stride is None:  # perplexity(): :486, :540, :565-569, :608-621
            starts, first = [i * ctx for i in range(len(tokens) // ctx)], ctx // 2
        else:  # perplexity_v2(): :342, :356, :417
            starts, first = [i * stride for i in range((len(tokens) - ctx + stride - 1) // stride)], ctx - stride - 1
        nll = []
        for start in starts:
            window = tokens[start: start + ctx]
            if bos is not None and stride is None:
                window[0] = bos
            llm.reset()
            llm.eval(window)
            logits = llm.scores[:ctx].astype(np.float64)
            for j in range(first, ctx - 1):
                row = logits[j] - logits[j].max()
                nll.append(math.log(np.exp(row).sum()) - row[tokens[start + j + 1]])
        return np.array(nll)
    finally:
        llm.close()


def _check(result, expected: np.ndarray) -> None:
    assert result.scored == len(expected)
    assert result.nll == pytest.approx(expected.mean(), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected.mean()), rel=1e-6)
    stderr = math.sqrt(expected.var() / (len(expected) - 1)) * math.exp(expected.mean())
    assert result.ppl_stderr == pytest.approx(stderr, rel=1e-4)


@pytest.mark.parametrize("with_bos", [False, True])
def test_windows_match_llama_cpp(with_bos: bool, tiny_model: Path, bos_model: Path, text: str,
                                 open_engine: Callable[..., Engine]) -> None:
    model = bos_model if with_bos else tiny_model
    engine = open_engine(model, ctx=CTX)
    ids = engine.tokenize(text, add_bos=True, special=False)
    assert (ids[0] == engine.added_bos()) == with_bos and len(ids) > 4 * CTX
    reports = []
    result = perplexity(engine, ids, CTX, progress=lambda done, total, item: reports.append((done, total)))
    assert result.windows == len(ids) // CTX and result.scored == result.windows * (CTX - CTX // 2 - 1)
    assert reports[-1] == (result.windows, result.windows)
    _check(result, _reference(engine, text, CTX, None))


def test_stride_matches_llama_cpp(bos_model: Path, text: str, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine(bos_model, ctx=CTX)
    result = text_perplexity(engine, text, CTX, stride=8)
    n_tokens = len(engine.tokenize(text, add_bos=True, special=False))
    assert result.windows == -(-(n_tokens - CTX) // 8) and result.scored == result.windows * 8
    _check(result, _reference(engine, text, CTX, 8))


def test_windows_and_their_limits() -> None:
    assert windows(1046, 64) == (range(0, 1024, 64), 32)
    assert windows(64, 64) == (range(0, 64, 64), 32)  # one window: llama.cpp would want 128 tokens
    assert windows(1046, 64, 16) == (range(0, 982, 16), 47)
    assert len(windows(1046, 64, 16)[0]) == 62  # llama.cpp's n_chunk_max = (1046 - 64 + 15) / 16
    assert windows(65, 64, 63) == (range(0, 1), 0)
    with pytest.raises(PerplexityError, match="has 63 tokens; ctx 64 needs at least 64; use --ctx 63 or less"):
        windows(63, 64)
    with pytest.raises(PerplexityError, match="has 64 tokens; ctx 64 with stride 8 needs at least 65"):
        windows(64, 64, 8)
    with pytest.raises(PerplexityError, match="has 10 tokens.*use a longer text"):
        windows(10, 64)
    with pytest.raises(PerplexityError, match="stride 64 must be between 1 and ctx - 1"):
        windows(1000, 64, 64)


def _rotary(*args: str):
    return CliRunner().invoke(main, ["perplexity", *args, "--profile", "cpu-only", "--placement", "experts-on-host"])


def test_cli_json(tiny_model: Path, text: str, tmp_path: Path) -> None:
    file = tmp_path / "text.txt"
    file.write_text(text)
    out = _rotary(str(tiny_model), str(file), "--ctx", str(CTX), "--stride", "8", "--json")
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {"model", "file", "n_ctx", "stride", "tokens", "windows", "scored_tokens", "nll", "ppl",
                           "ppl_stderr", "tokens_per_second", "seconds"}
    assert (report["file"], report["n_ctx"], report["stride"]) == (str(file), CTX, 8)
    assert report["ppl"] == pytest.approx(math.exp(report["nll"])) and report["scored_tokens"] == 8 * report["windows"]
    text_out = _rotary(str(tiny_model), str(file), "--ctx", str(CTX))
    assert text_out.exit_code == 0, text_out.stderr
    assert text_out.stdout.splitlines()[-1].startswith("Final estimate: PPL = ")


@pytest.mark.parametrize(("content", "args", "message"), [
    ("the river " * 10, ["--ctx", "64"],
     "text.txt has 41 tokens; ctx 64 needs at least 64; use --ctx 41 or less, or a longer text"),
    ("the river " * 100, ["--ctx", "32", "--stride", "32"], "stride 32 must be between 1 and ctx - 1 (31)"),
    ("", [], "text.txt: the file is empty"),
    (None, [], "text.txt: no such file"),
    (b"\xff\xfe", [], "text.txt: not UTF-8 text (byte 0)"),
])
def test_cli_bad_input(content: str | bytes | None, args: list[str], message: str, tiny_model: Path,
                       tmp_path: Path) -> None:
    file = tmp_path / "text.txt"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    out = _rotary(str(tiny_model), str(file), *args)
    assert out.exit_code == 2
    assert out.stderr.strip().splitlines() == [f"rotary: error: {message.replace('text.txt', str(file))}"]
