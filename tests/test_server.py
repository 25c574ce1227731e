"""`ferry serve` against a live server on 127.0.0.1: the real openai client, concurrent clients,
cancellation by disconnect, every refusal in OpenAI's error shape, the API key, a full queue.

The servers run uvicorn in a background thread over tiny checkpoints whose tokenizer is given a
simple chat template. `SlowEngine` wraps an engine so a test can hold the worker at a gate or
slow its tokens, which makes the queue and cancellation tests deterministic.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from ferry.cli import main  # noqa: E402
from ferry.engine import Engine, FerryConfig  # noqa: E402
from ferry.server import Worker, build_app, listen  # noqa: E402
from ferry.server.worker import StopMatcher  # noqa: E402

KEY = "test-key"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["The capital of France", "Count to ten: one two", "def add(a, b):", "A quick brown fox",
           "The lazy dog", "one two three", "return a + b", "Paris is"]


def load_engine(folder, template: str | None = TEMPLATE) -> Engine:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    config = FerryConfig.from_options(model=str(folder), dtype="fp32", device="cpu", progress=False)
    return Engine(config, tokenizer=tokenizer)


@contextmanager
def serving(app):
    """uvicorn serving `app` on a free port of 127.0.0.1 in a thread; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


class SlowEngine:
    """An engine whose generations wait at `gate` and pause `delay` seconds per token."""

    def __init__(self, engine: Engine):
        self.engine, self.gate, self.delay, self.streams = engine, threading.Event(), 0.0, []
        self.gate.set()
        self.plan = engine.plan

    def encode(self, prompt, chat=None):
        return self.engine.encode(prompt, chat)

    def close(self):
        self.engine.close()

    def stream(self, prompt, **options):
        self.gate.wait()
        stream = SlowStream(self.engine.stream(prompt, **options), self)
        self.streams.append(stream)
        return stream


class SlowStream:
    def __init__(self, stream, owner: SlowEngine):
        self.stream, self.owner, self.count, self.closed = stream, owner, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.owner.delay)
        token = next(self.stream)
        self.count += 1
        return token

    @property
    def result(self):
        return self.stream.result

    def close(self):
        self.closed = True
        self.stream.close()


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    folder = tiny_model_dir()
    with serving(build_app(Worker(lambda: load_engine(folder), 64), model_name="tiny", api_key=KEY)) as base:
        yield base


@pytest.fixture(scope="module")
def slow(tiny_model_dir):
    """(base URL, SlowEngine) of a server with room for one waiting request and no chat template."""
    folder = tiny_model_dir()
    worker = Worker(lambda: SlowEngine(load_engine(folder, template=None)), 1)
    with serving(build_app(worker, model_name="slow")) as base:
        yield base, worker.wait_loaded()


@functools.lru_cache(maxsize=None)
def client(base: str, key: str = KEY):
    """One openai client per server and key (its connection pool is thread-safe)."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def request(base: str, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
    """A raw request (bodies the openai client would refuse to send); (status, JSON reply)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data, headers=headers)
    reply = conn.getresponse()
    status, text = reply.status, reply.read()
    conn.close()
    return status, json.loads(text)


def health(base: str) -> dict:
    return request(base, "GET", "/health", key=None)[1]


def idle_health(base: str) -> dict:
    """The counts once the worker is idle: a reply can reach its client before the worker has
    counted it, so counts taken right after a request may still change."""
    wait_for(lambda: not health(base)["running"] and health(base)["queued"] == 0)
    return health(base)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def complete(base: str, prompt: str, stream: bool, chat: bool = False, **kw) -> tuple[str, str]:
    """(text, finish_reason) of one greedy request through the openai client."""
    c = client(base)
    if "ignore_eos" in kw:  # ferry's extension field (vLLM's name), beside OpenAI's
        kw["extra_body"] = {"ignore_eos": kw.pop("ignore_eos")}
    kw = {"model": "tiny", "max_tokens": 8, "temperature": 0, "stream": stream, **kw}
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            choice = c.chat.completions.create(messages=messages, **kw).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = list(c.chat.completions.create(messages=messages, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        return text, chunks[-1].choices[0].finish_reason
    if not stream:
        choice = c.completions.create(prompt=prompt, **kw).choices[0]
        return choice.text, choice.finish_reason
    chunks = list(c.completions.create(prompt=prompt, **kw))
    return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason


# --- replies ---------------------------------------------------------------------------------------

def test_chat_completion_fields(url):
    reply = client(url).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    stats = reply.model_extra["ferry"]
    assert reply.usage.completion_tokens == stats["new_tokens"] <= 6
    assert reply.usage.prompt_tokens == stats["prompt_tokens"] > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_whole(url):
    whole = complete(url, "The capital of France", stream=False, chat=True)
    assert complete(url, "The capital of France", stream=True, chat=True) == whole
    chunks = list(client(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4
    assert chunks[-2].choices[0].finish_reason is not None and "ferry" in chunks[-2].model_extra


def test_completions_streamed_and_whole(url):
    text, finish = complete(url, "Count to ten: one two", stream=False, max_tokens=12)
    assert finish in ("stop", "length") and text
    assert complete(url, "Count to ten: one two", stream=True, max_tokens=12) == (text, finish)


def test_raw_stream_ends_with_done(url):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "The", "max_tokens": 3, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    events = reply.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stop_strings_cut_the_text(url):
    text, _ = complete(url, "A quick brown fox", stream=False, max_tokens=16, ignore_eos=True)
    assert len(text) >= 6
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)]
    for stream in (False, True):
        assert complete(url, "A quick brown fox", stream, max_tokens=16, stop=[stop, "\u2603"],
                        ignore_eos=True) == (expected, "stop")


def test_stop_matcher_holds_back_a_split_stop():
    m = StopMatcher(("END", "xy"))
    assert m.push("abcE") == ("abc", False)
    assert m.push("N") == ("", False)
    assert m.push("Dzz") == ("", True)
    m = StopMatcher(("END",))
    assert m.push("aEN") == ("a", False) and m.push("x") == ("ENx", False) and m.flush() == ""
    assert StopMatcher(()).push("END") == ("END", False)


def test_models_and_health(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client(url).models.retrieve("tiny").id == "tiny"
    assert health(url)["status"] == "ok"


# --- concurrency and cancellation --------------------------------------------------------------------

def test_concurrent_clients_get_their_own_replies(url):
    """8 clients x 3 requests (streamed and whole, chat and text), greedy: each reply equals the
    same request run alone."""
    jobs = [(p, i % 2 == 1, i == 2) for p in PROMPTS for i in range(3)]
    alone = {job: complete(url, job[0], stream=False, chat=job[2]) for job in jobs}

    def client_run(prompt: str) -> list:
        return [(job, complete(url, *job)) for job in jobs if job[0] == prompt]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client_run, PROMPTS) for r in rs]
    assert len(results) == 24
    for job, got in results:
        assert got == alone[job], job


def test_disconnect_cancels_a_streamed_generation(slow):
    base, engine = slow
    before = idle_health(base)["cancelled"]
    engine.delay = 0.02
    try:
        stream = client(base).completions.create(model="slow", prompt="The capital", max_tokens=200,
                                                 extra_body={"ignore_eos": True}, stream=True)
        for _, _ in zip(stream, range(2)):
            pass
        stream.close()
        wait_for(lambda: health(base)["cancelled"] == before + 1)
    finally:
        engine.delay = 0.0
    assert engine.streams[-1].closed and engine.streams[-1].count < 100
    assert complete(base, "The capital", stream=False)[1] in ("stop", "length")


def test_disconnect_cancels_a_whole_reply_and_a_queued_one(slow):
    base, engine = slow
    before = idle_health(base)
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "The capital", "max_tokens": 200, "ignore_eos": True}).encode()
    raw = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    engine.gate.clear()
    try:
        running, queued = socket.create_connection((host, int(port))), socket.create_connection((host, int(port)))
        running.sendall(raw)
        wait_for(lambda: health(base)["running"])
        queued.sendall(raw)
        wait_for(lambda: health(base)["queued"] == 1)
        streams = len(engine.streams)
        queued.close()
        running.close()
        time.sleep(0.1)
    finally:
        engine.gate.set()
    wait_for(lambda: health(base)["cancelled"] == before["cancelled"] + 2)
    assert len(engine.streams) == streams + 1  # the queued request never started
    assert engine.streams[-1].closed and health(base)["finished"] == before["finished"]


def test_full_queue_answers_503(slow):
    base, engine = slow
    engine.gate.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(complete, base, "The", False)
            wait_for(lambda: health(base)["running"])
            second = pool.submit(complete, base, "A quick", False)
            wait_for(lambda: health(base)["queued"] == 1)
            with pytest.raises(openai.InternalServerError) as refused:
                complete(base, "Paris", False)
            assert refused.value.status_code == 503 and refused.value.code == "queue_full"
            engine.gate.set()
            assert first.result(10)[1] in ("stop", "length") and second.result(10)[1] in ("stop", "length")
    finally:
        engine.gate.set()


# --- refusals ------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", [1, 2], None),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": ["Hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "8"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": 5}, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "seed": 1.5}, "seed"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),  # token ids are not taken, in any shape
    ("/v1/completions", {"prompt": [[1, 2]]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
])
def test_bad_requests_are_400_in_openai_shape(url, path, body, param):
    status, reply = request(url, "POST", path, body)
    assert status == 400
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context(url, stream):
    prompt = "one two three four five six " * 100
    status, reply = request(url, "POST", "/v1/completions", {"prompt": prompt, "stream": stream})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = request(url, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": prompt}], "stream": stream})
    assert status == 400 and reply["error"]["param"] == "messages"
    assert complete(url, "The", stream=stream)[1] in ("stop", "length")  # still serving


def test_unknown_fields_are_ignored(url):
    status, reply = request(url, "POST", "/v1/chat/completions",
                            {"model": "whatever", "messages": MESSAGES, "max_tokens": 2, "presence_penalty": 0.5,
                             "user": "u1", "logit_bias": {}, "n": 1, "stop": None})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def test_chat_without_a_template(slow):
    status, reply = request(slow[0], "POST", "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 400 and reply["error"]["code"] == "no_chat_template"


def test_unknown_route_and_model(url):
    status, reply = request(url, "GET", "/v1/nothing")
    assert status == 404 and "error" in reply
    assert request(url, "GET", "/v1/models/other")[0] == 404


def test_api_key(url):
    for key in (None, "wrong"):
        status, reply = request(url, "POST", "/v1/completions", {"prompt": "The", "max_tokens": 2}, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert request(url, "GET", "/v1/models", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    assert request(url, "GET", "/health", key=None)[0] == 200


# --- the command ---------------------------------------------------------------------------------------

def test_serve_command_end_to_end(tiny_model_dir):
    """`ferry serve` loads, prints its URL, answers with the key from the environment, and
    stops cleanly on Ctrl-C."""
    env = {**os.environ, "FERRY_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", "-m", str(tiny_model_dir()), "--port", "0",
                             "--dtype", "fp32", "--model-name", "t"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving t " in line, proc.stderr.read() if proc.poll() is not None else line
        base = line.split(" at ")[1].strip().removesuffix("/v1")
        assert request(base, "POST", "/v1/completions", {"prompt": "The", "max_tokens": 2}, key=None)[0] == 401
        status, reply = request(base, "POST", "/v1/completions", {"prompt": "The", "max_tokens": 2}, key="env-key")
        assert status == 200 and reply["model"] == "t"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
    assert code == 0


def test_serve_port_in_use_exits_2(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code = main(["serve", "--port", str(taken.getsockname()[1])])
    assert code == 2 and "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_loopback_and_model_names():
    from ferry.cli.serve import is_loopback, model_name

    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert model_name(None) == "SmolLM2-135M-Instruct"
    assert model_name("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert model_name("/models/qwen2-7b.Q4_0.gguf") == "qwen2-7b.Q4_0"


def test_port_flag_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "70000"])
    assert exit_info.value.code == 2 and "--port" in capsys.readouterr().err


@pytest.mark.parametrize("stream", [False, True])
def test_tokenizer_ids_past_the_model_are_400_and_serving_goes_on(tiny_model_dir, stream):
    """A tokenizer with added tokens the model's embedding lacks: a prompt that uses one is
    refused with a 400 naming the id, before any forward pass; other prompts are answered."""
    from transformers import AutoTokenizer

    folder = tiny_model_dir()

    def engine():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = TEMPLATE
        extra = [f"<extra{i}>" for i in range(64)]
        tokenizer.add_tokens(extra)
        assert max(tokenizer.convert_tokens_to_ids(extra)) >= 384  # past the model's vocabulary
        config = FerryConfig.from_options(model=str(folder), dtype="fp32", device="cpu", progress=False)
        return Engine(config, tokenizer=tokenizer)

    with serving(build_app(Worker(engine, 4), model_name="tiny")) as base:
        status, reply = request(base, "POST", "/v1/completions", {"prompt": "Paris <extra63>", "stream": stream},
                                key=None)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
        assert "outside this model's vocabulary" in reply["error"]["message"]
        status, reply = request(base, "POST", "/v1/completions", {"prompt": "Paris is", "max_tokens": 4}, key=None)
        assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
