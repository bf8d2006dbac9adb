"""Bad files: one clear line, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from rotary_gguf.cli import main
from rotary_gguf.errors import MalformedGGUFError, NotGGUFError, NotMoEError, RotaryError, UnknownTypeError
from rotary_gguf.gguf import open_index


def _copy(src, tmp_path, name="bad.gguf"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def _tensor_field(path, name):
    reader = GGUFReader(path, "r+")
    return reader, next(t for t in reader.tensors if t.name == name).field


def _unknown_type(path):
    reader, field = _tensor_field(path, "blk.0.ffn_up_exps.weight")
    field.parts[4][0] = 250
    reader.data.flush()


def _offset_past_end(path):
    reader, field = _tensor_field(path, "blk.1.ffn_down_exps.weight")
    field.parts[5][0] = 1 << 40
    reader.data.flush()


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


CASES = {
    "not-gguf": (lambda p: p.write_bytes(b"PK\x03\x04 a zip file, not a model" * 4), NotGGUFError, "not a GGUF"),
    "empty": (lambda p: p.write_bytes(b""), NotGGUFError, "too short"),
    "truncated-header": (lambda p: _truncate(p, lambda n: 200), MalformedGGUFError, "truncated or corrupt"),
    "truncated-data": (lambda p: _truncate(p, lambda n: n - 1000), MalformedGGUFError, "runs past the end"),
    "offset-past-end": (_offset_past_end, MalformedGGUFError, "blk.1.ffn_down_exps.weight"),
    "unknown-type": (_unknown_type, UnknownTypeError, "unknown ggml type 250"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_raises_typed_error(tiny_model, tmp_path, case):
    damage, error, text = CASES[case]
    path = _copy(tiny_model, tmp_path)
    damage(path)
    with pytest.raises(error, match=text) as info:
        open_index(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_cli_one_line_exit_2(tiny_model, tmp_path, case):
    damage, _, text = CASES[case]
    path = _copy(tiny_model, tmp_path)
    damage(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_file_and_directory(tmp_path):
    for target, text in ((tmp_path / "nope.gguf", "no such file"), (tmp_path, "not a regular file")):
        result = CliRunner().invoke(main, ["inspect", str(target)])
        assert result.exit_code == 2 and text in result.stderr
        with pytest.raises(RotaryError):
            open_index(target)


def test_dense_model_to_experts_view(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "dense.gguf", "llama", [("blk.0.ffn_up.weight", np.zeros((64, 32), np.float32))],
                      block_count=1)
    with pytest.raises(NotMoEError):
        open_index(path).require_moe()
    result = CliRunner().invoke(main, ["inspect", "--json", str(path)])
    assert result.exit_code == 2 and "dense model" in result.stderr and result.stdout == ""


def test_hostile_shape_cannot_overflow(tiny_model, tmp_path):
    path = _copy(tiny_model, tmp_path)
    reader, field = _tensor_field(path, "blk.0.ffn_gate_exps.weight")
    field.parts[3][:] = [1 << 40, 1 << 40, 1 << 40]  # 2**120 elements: wraps around in uint64
    reader.data.flush()
    with pytest.raises(MalformedGGUFError, match="runs past the end"):
        open_index(path)


def test_duplicate_tensor_names(tiny_model, tmp_path):
    path = _copy(tiny_model, tmp_path)
    reader, q = _tensor_field(path, "blk.0.attn_q.weight")
    k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight").field
    k.parts[1][:] = q.parts[1]  # same length: rename attn_k to attn_q in place
    reader.data.flush()
    with pytest.raises(MalformedGGUFError, match="duplicated tensor"):
        open_index(path)
