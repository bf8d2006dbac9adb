"""`rotary serve` as clients see it: a real server process on 127.0.0.1 running the tiny model through the real
llama.cpp (rotary placement, slots on the CPU stand-in), driven by the official OpenAI client and httpx.

One server (3 expert slots per layer, --max-queue 8, an API key) is shared by the module's tests; the CLI
tests start their own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from rotary_gguf.runtime import Generation
from rotary_gguf.server.live import LiveView
from rotary_gguf.server.requests import GenerationRequest
from rotary_gguf.server.worker import EngineWorker
from rotary_gguf.synth import PRESETS, synth_model
from rotary_gguf.synth.vocab import CHAT_TEMPLATE

KEY = "sk-rotary-test"
CTX = 1024
# ChatML that refuses two user turns in a row, as many real templates do (raise_exception), and that never
# finishes for one message (a hostile template that passes the check at start).
ALTERNATING = ("{%- for message in messages %}{%- if loop.index0 > 0 and message['role'] == 'user' and "
               "loop.previtem['role'] == 'user' %}{{ raise_exception('Conversation roles must alternate "
               "user/assistant/user/assistant') }}{%- endif %}{%- if message['content'] == 'spin' %}"
               "{%- for i in range(99999) %}{%- for j in range(99999) %}{%- endfor %}{%- endfor %}{%- endif %}"
               "{%- endfor %}" + CHAT_TEMPLATE)
SCHEMA = {"type": "object", "required": ["ok", "colour", "count"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer"}}}


class Served:
    """A `rotary serve` process: its URL, the lines of its stderr, and a clean stop (SIGINT)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "rotary_gguf", "serve", *args, "--port", "0"]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        found = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if re.search(r"at http://127\.0\.0\.1:\d+/", line):
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(120) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError(f"rotary serve did not start: {''.join(self.lines)}")
        port = re.search(r"at http://127\.0\.0\.1:(\d+)/", "".join(self.lines)).group(1)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    @property
    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("serve")
    return synth_model(folder / "tiny-chat.gguf", PRESETS["tiny"], "f32", seed=1, chat_template=ALTERNATING).path


@pytest.fixture(scope="module")
def _shared() -> Iterator[dict[str, Served]]:
    servers: dict[str, Served] = {}
    yield servers
    for server in servers.values():
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture
def server(_shared, chat_model, slot_budget) -> Served:
    """The module's server, started by the first test that needs it."""
    if "main" not in _shared:
        _shared["main"] = Served(str(chat_model), "--placement", "rotary", "--profile", "rtx4060-laptop-8gb",
                                 "--vram-budget", f"{slot_budget(chat_model, 3, CTX)}B", "--ctx", str(CTX),
                                 "--alias", "tiny-moe", "--api-key", KEY, "--max-queue", "8",
                                 env={"ROTARY_SCHED_DEVICE": "cpu"})
    assert _shared["main"].proc.poll() is None, _shared["main"].log
    return _shared["main"]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


# The OpenAI client

def test_models_list_names_the_alias(client):
    assert [m.id for m in client.models.list().data] == ["tiny-moe"]
    assert client.models.retrieve("tiny-moe").owned_by == "rotary-gguf"


def test_chat_stream_chunks_concatenate_to_the_whole_answer(client):
    kwargs = {"model": "tiny-moe", "messages": _ask("Name three colours."), "max_tokens": 32, "temperature": 0,
              "seed": 7}
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny-moe" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    usage = whole.usage
    assert usage.completion_tokens <= 32 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny-moe", messages=_ask("Hi"), max_tokens=8, temperature=0,
                                                 stream=True))
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_whole_and_streamed(client):
    kwargs = {"model": "tiny-moe", "prompt": "The quick brown fox", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens <= 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    default = client.completions.create(model="tiny-moe", prompt="The quick brown fox", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    ids = client.completions.create(model="tiny-moe", prompt=[10, 11, 12, 13], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 4


def test_json_schema_output_parses_and_validates(client):
    for seed, temperature in ((0, 0.0), (1, 0.9), (2, 1.3)):
        fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA, "strict": True}}
        reply = client.chat.completions.create(model="tiny-moe", messages=_ask("A JSON report, please."),
                                               max_tokens=96, seed=seed, temperature=temperature, response_format=fmt)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_json_object_output_is_an_object(client):
    reply = client.chat.completions.create(model="tiny-moe", messages=_ask("JSON"), max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"})
    content = reply.choices[0].message.content
    assert content.lstrip().startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_stop_sequences_end_the_answer_before_them(client):
    kwargs = {"model": "tiny-moe", "messages": _ask("Count."), "max_tokens": 40, "temperature": 0}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[8:11]
    reply = client.chat.completions.create(**kwargs, stop=[stop, "\x00never"]).choices[0]
    assert reply.finish_reason == "stop" and reply.message.content == full[: full.index(stop)]
    chunks = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.message.content


def test_a_conversation_reuses_the_kv_cache_of_its_previous_turn(client):
    messages = _ask("Tell me about mixtures of experts. " * 12)
    first = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=16, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=16, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


# Bad input: one OpenAI-shaped error each, and the server goes on

BAD = [
    ("invalid JSON", b'{"model": "m", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing messages", {"model": "m"}, 400, "messages"),
    ("ill-typed max_tokens", {"model": "m", "messages": _ask("x"), "max_tokens": "5"}, 400, "max_tokens"),
    ("negative max_tokens", {"model": "m", "messages": _ask("x"), "max_tokens": -1}, 400, "max_tokens"),
    ("bad role", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("unknown field", {"model": "m", "messages": _ask("x"), "frobnicate": 1}, 400, "frobnicate"),
    ("n > 1", {"model": "m", "messages": _ask("x"), "n": 2}, 400, "n"),
    ("logprobs", {"model": "m", "messages": _ask("x"), "logprobs": True}, 400, "logprobs"),
    ("tools", {"model": "m", "messages": _ask("x"), "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("presence_penalty", {"model": "m", "messages": _ask("x"), "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("image part", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages[0].content[0].type"),
    ("stream_options without stream", {"model": "m", "messages": _ask("x"), "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("five stop strings", {"model": "m", "messages": _ask("x"), "stop": list("abcde")}, 400, "stop"),
    ("json_schema without schema", {"model": "m", "messages": _ask("x"), "response_format": {"type": "json_schema"}},
     400, "response_format.json_schema"),
    ("unusable schema", {"model": "m", "messages": _ask("x"), "response_format": {"type": "json_schema",
     "json_schema": {"name": "s", "schema": {"properties": {"a": {"$ref": "#/$defs/none"}}}}}},
     400, "response_format.json_schema.schema"),
    ("template refuses", {"model": "m", "messages": [{"role": "user", "content": "a"},
                                                     {"role": "user", "content": "b"}]}, 400, "messages"),
    ("prompt over the context", {"model": "m", "messages": _ask("word " * 3000)}, 400, "messages"),
    ("template that never finishes", {"model": "m", "messages": _ask("spin")}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_chat_requests_get_one_error_and_the_server_goes_on(http, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert http.get("/health").json()["status"] == "ok"


def test_a_prompt_over_the_context_says_how_long_and_what_fits(http):
    response = http.post("/v1/completions", json={"model": "m", "prompt": "word " * 3000})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert re.search(rf"maximum context length is {CTX} tokens, and the prompt has \d+: at most {CTX - 1}",
                     error["message"])


def test_other_refusals(server, http):
    big = b'{"model": "m", "prompt": "' + b"x" * (8 * 2**20) + b'"}'
    too_big = http.post("/v1/completions", content=big)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield b'{"model": "m", "prompt": "'
        for _ in range(9):
            yield b"x" * 2**20
        yield b'"}'

    assert http.post("/v1/completions", content=chunked()).status_code == 413
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    wrong = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer nope"}, json={})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # open, like the page
    assert http.get("/v1/nothing").status_code == 404 and http.get("/v1/nothing").json()["error"]["message"]
    assert http.get("/v1/chat/completions").status_code == 405
    other = http.get("/v1/models/gpt-4")
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    out_of_vocab = http.post("/v1/completions", json={"model": "m", "prompt": [10, 999999]})
    assert out_of_vocab.status_code == 400 and out_of_vocab.json()["error"]["param"] == "prompt"
    assert http.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]}).status_code == 400
    assert http.post("/v1/completions", json={"model": "m", "prompt": "x", "echo": True}).status_code == 400
    assert http.get("/health").json()["status"] == "ok"


# Queue, load, disconnects

def test_forty_concurrent_requests_get_200_or_429_and_none_is_lost(server, http):
    body = {"model": "m", "messages": _ask("Write a long story."), "max_tokens": 48, "temperature": 0}

    def one(i: int) -> tuple[int, str]:
        """(status, the answer's text; for a 429, its Retry-After and error code)."""
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            if i % 2:
                with c.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}) as r:
                    text = "".join(r.iter_text())
            else:
                r = c.post(f"{server.url}/v1/chat/completions", json=body)
                text = r.text
            if r.status_code == 429:
                return 429, f"{r.headers.get('retry-after')} {json.loads(text)['error']['code']}"
            return r.status_code, text

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40), timeout=240))
    elapsed = time.monotonic() - started
    statuses = [status for status, _ in results]
    assert len(results) == 40 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 9 and statuses.count(429) >= 1, statuses
    assert all(re.fullmatch(r"[1-9]\d* rate_limit_exceeded", extra) for status, extra in results if status == 429)
    assert all("[DONE]" in extra or '"finish_reason"' in extra for status, extra in results if status == 200)
    print(f"load: 40 requests, {statuses.count(200)} x 200, {statuses.count(429)} x 429, {elapsed:.1f} s")
    assert http.get("/health").json() == {"status": "ok", "model": "tiny-moe", "queue": 0, "running": False}
    metrics = http.get("/metrics").text
    assert 'rotary_requests_total{endpoint="/v1/chat/completions",status="429"}' in metrics


def _idle(http: httpx.Client) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not http.get("/health").json()["running"]:  # the worker's last picture is taken by then
            return http.get("/v1/rotary/stats").json()
        time.sleep(0.02)
    raise AssertionError("the engine did not go idle")


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, http, client):
    body = {"model": "m", "messages": _ask("Never stop talking."), "max_tokens": 960, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            received = 0
            for line in r.iter_lines():
                received += line.startswith("data: ")
                if received == 8:
                    break
    left = time.monotonic()
    last = _idle(http)["last"]
    assert received == 8 and last["finish_reason"] == "interrupted" and last["generated"] < 960, last
    reply = client.chat.completions.create(model="m", messages=_ask("Hi"), max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None and time.monotonic() - left < 5


def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(_shared, small_model):
    """On the `small` model (about 3 s for these tokens here), so that the answer cannot finish before the
    server's first disconnect check (DISCONNECT_POLL): the tiny model can, on an idle machine."""
    if "small" not in _shared:
        _shared["small"] = Served(str(small_model), "--profile", "cpu-only", "--ctx", str(CTX), "--api-key", KEY)
    served = _shared["small"]
    body = {"model": "m", "messages": _ask("Never stop talking."), "max_tokens": 960, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=0.2,
                   headers={"Authorization": f"Bearer {KEY}"})
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        last = _idle(http)["last"]
    assert last["finish_reason"] == "interrupted" and last["generated"] < 960, last


def test_a_cancelled_job_stops_within_one_token_and_the_next_runs(tiny_model, open_engine):
    """The worker in this process: a cancel while tokens stream ends the generation after at most the token
    being decoded; a job cancelled while it waits never runs."""
    engine = open_engine(tiny_model, ctx=512)
    worker = EngineWorker(engine, LiveView("tiny"), max_queue=2)
    worker.start()

    def request(max_tokens: int) -> GenerationRequest:
        return GenerationRequest("completion", "m", None, "The quick brown fox", max_tokens, temp=0.0, top_k=40,
                                 top_p=1.0, min_p=0.05, seed=0, stop=(), grammar=None, stream=True,
                                 include_usage=False)

    async def run() -> tuple[int, Generation, list[str]]:
        loop = asyncio.get_running_loop()
        long, waiting, after = worker.submit(request(400), loop), worker.submit(request(4), loop), None
        assert (await long.next_event()).kind == "start"
        for _ in range(3):
            assert (await long.next_event()).kind == "text"
        worker.cancel(waiting)
        worker.cancel(long)
        seen = len(long.stream.tokens)
        while (event := await long.next_event()).kind == "text":
            pass
        after = worker.submit(request(4), loop)
        kinds = [(await after.next_event()).kind]
        while kinds[-1] not in ("done", "error"):
            kinds.append((await after.next_event()).kind)
        assert await waiting.next_event(0.2) is None  # it never started
        return seen, event.generation, kinds

    try:
        seen, cancelled, kinds = asyncio.run(run())
    finally:
        worker.stop()
    assert cancelled.finish_reason == "interrupted" and len(cancelled.tokens) <= seen + 1
    assert kinds[0] == "start" and kinds[-1] == "done" and worker.state.waiting == 0


# Live view, metrics, page

def test_rotary_stats_show_the_slots_of_every_layer(http, client):
    before = http.get("/v1/rotary/stats").json()
    client.chat.completions.create(model="m", messages=_ask("Stats, please."), max_tokens=24, temperature=0)
    after = http.get("/v1/rotary/stats").json()
    assert after["seq"] > before["seq"] and after["placement"] == "rotary" and after["state"] == "idle"
    rotary = after["rotary"]
    assert rotary["device"].startswith("rotary expert scheduler, slots on CPU")
    assert [layer["layer"] for layer in rotary["layers"]] == [0, 1]
    for layer in rotary["layers"]:
        assert layer["slots"] == 3 and layer["experts"] == 8 and len(layer["selections"]) == 8
        assert len(layer["resident"]) <= 3 and all(0 <= e < 8 for e in layer["resident"])
        assert layer["hits"] + layer["misses"] == sum(layer["selections"]) > 0
    assert 0 <= rotary["hit_rate"] <= 1 and after["memory"]["rss_bytes"] > 0
    assert after["last"]["generated"] > 0


def test_metrics_in_prometheus_text_format(http, client):
    client.chat.completions.create(model="m", messages=_ask("Metrics."), max_tokens=8, temperature=0)
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("rotary_requests_total", "rotary_prompt_tokens_total", "rotary_completion_tokens_total",
                 "rotary_prompt_tokens_cached_total", "rotary_prompt_tokens_per_second",
                 "rotary_decode_tokens_per_second", "rotary_queue_depth", "rotary_requests_running",
                 "rotary_expert_hit_rate", "rotary_expert_reads_total", "rotary_host_rss_bytes",
                 "rotary_request_duration_seconds_bucket"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? [0-9.e+-]+$", text, re.MULTILINE), name
    served = re.search(r'^rotary_requests_total\{endpoint="/v1/chat/completions",status="200"\} ([0-9.]+)$', text,
                       re.MULTILINE)
    assert served and float(served.group(1)) >= 1


def test_the_page_is_self_contained(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/rotary/stats" in page.text and "/v1/chat/completions" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing fetched from elsewhere
    assert "@import" not in page.text


# The command line

def test_serve_stops_cleanly_on_ctrl_c_while_streaming(tiny_model):
    served = Served(str(tiny_model), "--profile", "cpu-only", "--placement", "experts-on-host", "--ctx", "256")
    body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 240, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
        assert served.stop() == 0
    assert "rotary serve: stopped" in served.log and "Traceback" not in served.log, served.log


def test_serve_refuses_bad_input_in_one_line(tiny_model, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rotary_gguf", "serve", *args], capture_output=True, text=True,
                              timeout=120)

    missing = serve(str(tmp_path / "none.gguf"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "rotary: error:" in missing.stderr
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve(str(tiny_model), "--profile", "cpu-only", "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "rotary: error: cannot listen on 127.0.0.1:" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr and busy.stderr.count("\n") == 1
    empty = serve(str(tiny_model), "--api-key", " ")
    assert empty.returncode == 2 and "--api-key must not be empty" in empty.stderr
