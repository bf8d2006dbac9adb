"""What the engine adds for `rotary serve`: stop strings (the text ends before the first one, held back across
pieces), finish reasons, and llama.cpp grammars from JSON schemas that constrain every sampled token."""

from __future__ import annotations

import json

import jsonschema
import pytest

from rotary_gguf.runtime import Sampling
from rotary_gguf.runtime.generation import GrammarError, _StopScan, json_grammar

FOX = "The quick brown fox"
SCHEMA = {"type": "object", "required": ["ok", "colour", "count"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer"}}}


@pytest.fixture
def engine(tiny_model, open_engine):
    return open_engine(tiny_model, ctx=256)


@pytest.fixture
def reference(engine):
    """48 greedy tokens of FOX, with no stop strings."""
    return engine.complete(FOX, 48)


def test_stop_string_ends_the_text_before_it(engine, reference):
    stop = reference.text[12:16]
    assert stop and stop in reference.text
    stream = engine.generate(FOX, 48, stop=[stop, "never-said"])
    pieces = list(stream)
    g = stream.result
    assert "".join(pieces) == g.text == reference.text[: reference.text.index(stop)]
    assert g.stop_text == stop and g.finish_reason == "stop" and not g.interrupted
    assert len(g.tokens) < len(reference.tokens) and g.tokens == reference.tokens[: len(g.tokens)]


def test_a_stop_string_never_said_changes_nothing(engine, reference):
    # The text's own tail starts this stop string: held back, then given out at the end.
    stop = [reference.text.rstrip("\ufffd")[-3:] + "\x00never"]
    g = engine.complete(FOX, 48, stop=stop)
    assert g.text == reference.text and g.stop_text is None and g.finish_reason == "length"
    assert "".join(engine.generate(FOX, 48, stop=stop)) == "".join(engine.generate(FOX, 48))


def test_stop_scan_holds_back_a_possible_start_across_pieces():
    scan = _StopScan(["</s>", "END"])
    assert [scan.feed(p) for p in ("ab", "c<", "/", "s>def")] == ["ab", "c", "", ""]
    assert scan.found == "</s>" and scan.emitted == "abc"
    scan = _StopScan(["</s>"])
    assert [scan.feed(p) for p in ("x<", "y")] == ["x", "<y"] and scan.flush() == "" and scan.found is None
    scan = _StopScan(["EN"])
    assert scan.feed("aE") == "a" and scan.flush() == "E" and scan.emitted == "aE"
    assert _StopScan([]).feed("anything") == "anything"


def test_finish_reasons(engine, reference):
    assert reference.finish_reason == "length"
    stream = engine.generate(FOX, 48)
    next(stream)
    stream.stop()
    assert stream.drain().finish_reason == "interrupted"
    with pytest.raises(ValueError, match="must not be empty"):
        engine.generate(FOX, 8, stop=[""])


@pytest.mark.parametrize(("temp", "seed"), [(0.0, 0), (0.8, 1), (1.0, 2), (1.5, 3)])
def test_json_schema_grammar_output_parses_and_validates(engine, temp, seed):
    g = engine.complete(FOX, 96, sampling=Sampling(temp=temp, seed=seed, grammar=json_grammar(SCHEMA)))
    assert g.finish_reason == "stop", g.text
    jsonschema.validate(json.loads(g.text), SCHEMA)


def test_json_object_grammar_starts_an_object_and_streams_the_same(engine):
    sampling = Sampling(grammar=json_grammar())
    g = engine.complete(FOX, 64, sampling=sampling)
    assert g.text.lstrip().startswith("{")
    if g.finish_reason == "stop":
        assert isinstance(json.loads(g.text), dict)
    assert "".join(engine.generate(FOX, 64, sampling=sampling)) == g.text


def test_grammar_without_it_the_text_is_unconstrained(engine, reference):
    """The same greedy run with no grammar is the reference run: the grammar path leaves the default alone."""
    assert engine.complete(FOX, 48, sampling=Sampling()).text == reference.text


def test_grammars_llama_cpp_refuses_are_one_error_and_the_engine_goes_on(engine, reference):
    with pytest.raises(GrammarError, match="cannot parse the grammar"):
        engine.generate(FOX, 8, sampling=Sampling(grammar='root ::= ("a"'))
    with pytest.raises(GrammarError, match="JSON schema cannot be turned into a grammar"):
        json_grammar({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    assert engine.complete(FOX, 48).text == reference.text
