"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port (in a
thread, tiny Qwen2 pair in fp32), spoken to with the official `openai` client and raw httpx.

Greedy outputs are compared with references computed by `Pipeline.generate` directly before the
server starts; streamed pieces must concatenate to the same text. Everything stays on 127.0.0.1
and every request loop is bounded.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specbranch.config import GenerationConfig, ModelConfig, SamplingConfig, ServeConfig, SpeculationConfig
from specbranch.pipeline import Pipeline
from specbranch.server import build_server

KEY = "test-key"
PROMPT = "def add(a, b):"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
N = 24  # max_tokens of the reference requests


@contextmanager
def running_server(pipe: Pipeline, cfg: ServeConfig):
    """A real uvicorn server on a kernel-chosen free port of 127.0.0.1, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = build_server(pipe, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def load(tiny_pair, max_len: int) -> Pipeline:
    return Pipeline(ModelConfig(target=str(tiny_pair["target"]), draft=str(tiny_pair["draft"]), precision="fp32",
                                max_len=max_len, threads=1), progress=False)


@dataclass
class Main:
    url: str
    pipe: Pipeline
    client: openai.OpenAI
    http: httpx.Client

    def ids(self, text: str) -> list[int]:
        return self.pipe.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.ids(self.pipe.tokenizer.apply_chat_template(messages))


@pytest.fixture(scope="module")
def refs(tiny_pair):
    """The pipeline of the main server, and greedy references computed before the server runs."""
    pipe = load(tiny_pair, max_len=512)
    tok = pipe.tokenizer

    def ref(ids, engine="specbranch", n=N, stop=()):
        return pipe.generate(ids, GenerationConfig(max_new_tokens=n, chat_template=False, engine=engine, stop=stop),
                             SamplingConfig())

    out = {
        "completion": ref(tok.encode(PROMPT)),
        "completion_ar": ref(tok.encode(PROMPT), engine="ar"),
        "chat": ref(tok.encode(tok.apply_chat_template(CHAT))),
        "load": {p: ref(tok.encode(p), n=12).text for p in ("Hello", "def f(x):", "world", "a + b")},
    }
    text = out["completion"].text
    # a stop string in the middle of the reference text: the output must be cut before it
    out["stop"] = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    out["completion_stop"] = ref(tok.encode(PROMPT), stop=(out["stop"],))
    return pipe, out


@pytest.fixture(scope="module")
def main(refs):
    pipe, _ = refs
    cfg = ServeConfig(api_key=KEY, max_queue=64, max_tokens_limit=445, log_level="warning")
    with running_server(pipe, cfg) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            yield Main(url, pipe, client, http)


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream, and the final [DONE] marker as the string 'DONE'."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append("DONE" if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------- happy paths with the openai client


def test_models_and_health(main):
    assert [m.id for m in main.client.models.list().data] == ["target"]
    assert main.client.models.retrieve("target").id == "target"
    r = httpx.get(main.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_equals_the_pipeline(main, refs):
    want = refs[1]["completion"]
    r = main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(main.ids(PROMPT)) and r.usage.completion_tokens == len(want.tokens)
    spec = r.model_extra["speculative_metrics"]
    assert spec["engine"] == "specbranch" and spec["new_tokens"] == len(want.tokens)
    assert spec["num_draft_tokens"] > 0 and "acceptance_rate" in spec and "rollback_tokens" in spec


def test_completion_stream_is_token_by_token_and_equals_the_text(main, refs):
    want = refs[1]["completion"]
    chunks = list(main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0,
                                                 stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == want.text
    # one chunk per token that releases text: at least all tokens but the held-back partial characters
    assert len(pieces) >= len(want.tokens) - want.text.count("\ufffd") - 1 and len(pieces) <= len(want.tokens)
    last = chunks[-1]
    assert last.choices[0].finish_reason == want.finish_reason
    assert last.usage.completion_tokens == len(want.tokens)
    assert last.model_extra["speculative_metrics"]["new_tokens"] == len(want.tokens)


@pytest.fixture(scope="module")
def self_drafted(tiny_pair):
    """A server whose draft is its target: every draft is accepted, so rounds commit several tokens."""
    pipe = Pipeline(ModelConfig(target=str(tiny_pair["target"]), draft=str(tiny_pair["target"]), precision="fp32",
                                max_len=512, threads=1), progress=False)
    rounds: list[list[int]] = []
    # tau = 0: never cut a block (on a random tiny model every draft token is below any useful tau)
    want = pipe.generate(pipe.tokenizer.encode(PROMPT), GenerationConfig(max_new_tokens=N, chat_template=False,
                                                                         engine="specbranch"),
                         spec=SpeculationConfig(tau=0.0), on_tokens=rounds.append)
    with running_server(pipe, ServeConfig(log_level="warning")) as url:
        yield url, want, rounds


def test_stream_sends_a_chunk_per_token_when_a_round_commits_several(self_drafted):
    url, want, rounds = self_drafted
    assert max(len(r) for r in rounds) >= 3  # the premise: speculative rounds commit several tokens at once
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    chunks = list(client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            extra_body={"speculative": {"engine": "specbranch", "tau": 0.0}}))
    pieces = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert "".join(pieces) == want.text
    held = want.text.count("\ufffd")  # a token ending in a partial UTF-8 character is sent with the next one
    assert len(rounds) < len(want.tokens) - held - 1 <= len(pieces) <= len(want.tokens)
    assert chunks[-1].model_extra["speculative_metrics"]["mean_accepted_length"] > 2


def test_chat_stream_and_non_stream_equal_the_pipeline(main, refs):
    want = refs[1]["chat"]
    r = main.client.chat.completions.create(model="target", messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(main.chat_ids(CHAT))
    assert r.model_extra["speculative_metrics"]["engine"] == "specbranch"

    chunks = list(main.client.chat.completions.create(model="target", messages=CHAT, max_tokens=N, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == want.finish_reason
    assert finals[0].model_extra["speculative_metrics"]["new_tokens"] == len(want.tokens)
    # include_usage: OpenAI's extra last chunk with no choices and the usage
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)


def test_raw_sse_ends_with_done(main, refs):
    body = {"model": "target", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with main.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "DONE" and events[-2]["usage"]["completion_tokens"] == 8
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_cut_stream_and_non_stream_alike(main, refs):
    stop, want = refs[1]["stop"], refs[1]["completion_stop"]
    assert want.text == refs[1]["completion"].text.split(stop)[0] and want.finish_reason == "stop"
    for stops in (stop, [stop, "zzzz-never"]):
        r = main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0, stop=stops)
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
        chunks = list(main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0,
                                                     stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_per_request_engine_and_speculation(main, refs):
    want_ar = refs[1]["completion_ar"]
    r = main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0,
                                       extra_body={"speculative": {"engine": "ar"}})
    spec = r.model_extra["speculative_metrics"]
    assert r.choices[0].text == want_ar.text and spec["engine"] == "ar" and spec["num_draft_tokens"] == 0
    r = main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0,
                                       extra_body={"speculative": {"engine": "sd", "num_draft_tokens": 2}})
    spec = r.model_extra["speculative_metrics"]
    assert spec["engine"] == "sd" and spec["num_draft_tokens"] <= 2 * spec["num_drafts"]
    assert r.usage.completion_tokens == N


def test_sampling_with_a_seed_is_reproducible(main):
    def go(seed):
        return main.client.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].text

    a, b = go(7), go(7)
    assert a == b and len(a) > 0
    assert any(go(s) != a for s in (8, 9, 10))  # different seeds sample different texts


# ---------------------------------------------------------------- errors


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


COMPLETION = {"model": "target", "prompt": PROMPT, "max_tokens": 4}
CHAT_BODY = {"model": "target", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path,body,status,param,needle", [
    ("/v1/completions", b'{"model": "target", "prompt": ', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"not json at all", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", b"", 400, None, "JSON object"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 100000}, 400, "max_tokens", "limit"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 444}, 400, "max_tokens", "context"),
    ("/v1/completions", {**COMPLETION, "prompt": "def add(a, b): return a + b\n" * 200}, 413, "prompt", "context"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "user", "content": "Hello world " * 400}]},
     413, "messages", "context"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "4"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": "target"}, 400, "prompt", "required"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": "hi"}, 400, "messages", "list"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "'user'"),
    ("/v1/completions", {**COMPLETION, "speculative": {"engine": "turbo"}}, 400, "speculative.engine", "turbo"),
    ("/v1/completions", {**COMPLETION, "speculative": {"num_draft_tokens": 99}}, 400, "speculative", "gamma"),
    ("/v1/completions", {**COMPLETION, "speculative": {"gama": 3}}, 400, "speculative.gama", "xtra"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, None, "top_p"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, 400, None, "temperature"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, 400, "stop", "empty"),
    ("/v1/completions", {**COMPLETION, "n": 2}, 400, "n", "n = 1"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 99999]}, 400, "prompt", "vocabulary"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages", "text"),
    ("/v1/nope", {}, 404, None, "no such endpoint"),
])
def test_bad_requests_get_openai_errors(main, path, body, status, param, needle):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = main.http.post(path, **kw)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert needle in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_oversized_body_and_wrong_method(main):
    host, port = main.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # announce 1 GB, send none of it
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n".encode())
        head = ""
        while "request_too_large" not in head:  # headers and body may arrive in separate packets
            chunk = s.recv(65536).decode("latin-1")
            if not chunk:
                break
            head += chunk
    assert head.startswith("HTTP/1.1 413") and "request_too_large" in head
    r = main.http.get("/v1/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_errors_reach_openai_clients_and_the_server_lives_on(main, refs):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        main.client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be >= 1"):
        main.client.chat.completions.create(model="target", messages=CHAT, max_tokens=0)
    r = main.client.completions.create(model="target", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == refs[1]["completion"].text


def test_api_key_required_except_on_health(main):
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(main.url + path).status_code == 401
        r = httpx.get(main.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    r = httpx.post(main.url + "/v1/completions", json=COMPLETION)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    bad = openai.OpenAI(base_url=main.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(main.url + "/health").status_code == 200


def test_prometheus_metrics(main):
    main.client.completions.create(model="target", prompt=PROMPT, max_tokens=5, temperature=0)
    main.http.post("/v1/completions", json={**COMPLETION, "max_tokens": 0})
    r = main.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("specbranch_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value("specbranch_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert value("specbranch_generation_tokens_total", engine="specbranch") >= 5
    assert value("specbranch_prompt_tokens_total", engine="specbranch") >= len(main.ids(PROMPT))
    assert value("specbranch_num_draft_tokens_total", engine="specbranch") > 0
    assert value("specbranch_num_drafts_total", engine="specbranch") > 0
    for name in ("num_accepted_tokens", "rollback_tokens", "num_branch_points", "num_branch_hits"):
        assert ("specbranch_" + name + "_total", (("engine", "specbranch"),)) in samples
    assert value("specbranch_request_latency_seconds_count", endpoint="/v1/completions") >= 2
    assert value("specbranch_time_to_first_token_seconds_count", endpoint="/v1/completions") >= 1
    assert value("specbranch_requests_waiting") == 0


def test_concurrent_load(main, refs):
    """32 greedy requests from 8 client threads, half of them streamed: all complete and identical
    to the reference of their prompt."""
    want = refs[1]["load"]
    prompts = list(want)

    def one(i: int) -> tuple[bool, float]:
        prompt, t0 = prompts[i % len(prompts)], time.perf_counter()
        if i % 2:
            chunks = main.client.completions.create(model="target", prompt=prompt, max_tokens=12, temperature=0,
                                                    stream=True)
            text = "".join(c.choices[0].text for c in chunks)
        else:
            r = main.client.completions.create(model="target", prompt=prompt, max_tokens=12, temperature=0)
            text = r.choices[0].text
            assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
        return text == want[prompt], time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32), timeout=60))
    wall = time.perf_counter() - t0
    lat = sorted(s for _, s in results)
    errors = sum(not ok for ok, _ in results)
    p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    print(f"\n[load] requests=32 threads=8 errors={errors} p50={p50 * 1000:.0f}ms p95={p95 * 1000:.0f}ms "
          f"max={lat[-1] * 1000:.0f}ms wall={wall:.2f}s throughput={32 / wall:.1f} req/s")
    assert errors == 0 and len(results) == 32


# ---------------------------------------------------------------- queueing, 429 and disconnects


@pytest.fixture(scope="module")
def busy(tiny_pair):
    """A server that lets one request wait besides the running one, on a pipeline with room for
    long (several seconds) generations."""
    pipe = load(tiny_pair, max_len=4096)
    with running_server(pipe, ServeConfig(max_queue=1, log_level="warning")) as url:
        yield url


def metric(url: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


LONG = {"model": "target", "prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True,
        "speculative": {"engine": "sd"}}  # ~7 s uninterrupted on this machine


def test_full_queue_is_429_and_leaving_clients_free_the_engine(busy):
    short = {"model": "target", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}  # greedy: never an early EOS
    with httpx.Client(base_url=busy, timeout=30) as a, httpx.Client(base_url=busy, timeout=30) as b:
        with a.stream("POST", "/v1/completions", json=LONG) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating now
            with b.stream("POST", "/v1/completions", json=LONG) as waiting:
                assert waiting.status_code == 200  # queued: its stream is open, no token yet
                t = time.monotonic()
                while httpx.get(busy + "/health").json()["waiting"] != 1:
                    assert time.monotonic() - t < 10
                    time.sleep(0.01)
                r = httpx.post(busy + "/v1/completions", json=short)
                assert r.status_code == 429
                err = error_of(r)
                assert err["type"] == "rate_limit_error" and "--max-queue 1" in err["message"]
                # both clients leave here, mid-stream
    t0 = time.perf_counter()
    r = httpx.post(busy + "/v1/completions", json=short, timeout=30)
    served_in = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert served_in < 3.0, f"the engine was not freed: the next request took {served_in:.1f}s"
    t = time.monotonic()
    while metric(busy, "specbranch_generations_total", finish_reason="cancelled") < 1:
        assert time.monotonic() - t < 5
        time.sleep(0.05)
    assert metric(busy, "specbranch_generations_total", finish_reason="length") == 1  # only the short one ran out
    assert metric(busy, "specbranch_generation_tokens_total", engine="sd") < 3000  # cut short
    assert metric(busy, "specbranch_requests_total", endpoint="/v1/completions", status="429") == 1


def test_non_streaming_client_that_gives_up_frees_the_engine(busy):
    before = metric(busy, "specbranch_generations_total", finish_reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy + "/v1/completions", json={**LONG, "stream": False}, timeout=0.5)
    t0 = time.perf_counter()
    r = httpx.post(busy + "/v1/completions", json={"model": "target", "prompt": PROMPT, "max_tokens": 4,
                                                   "temperature": 0}, timeout=30)
    assert r.status_code == 200 and time.perf_counter() - t0 < 3.0
    t = time.monotonic()
    while metric(busy, "specbranch_generations_total", finish_reason="cancelled") < before + 1:
        assert time.monotonic() - t < 5
        time.sleep(0.05)


# ---------------------------------------------------------------- the `specbranch serve` command


def test_serve_flags_come_from_serve_config():
    from specbranch.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--max-queue", "3", "--engine", "sd", "--gamma", "2"])
    cfg = config_from_args(ServeConfig, args)
    assert cfg == ServeConfig(max_queue=3, engine="sd") and args.gamma == 2
    assert cfg.host == "127.0.0.1" and cfg.port == 8000  # loopback by default
    assert ServeConfig().default_engine(has_draft=True) == "specbranch"
    assert ServeConfig().default_engine(has_draft=False) == "ar"


def test_specbranch_serve_command(tiny_pair, tmp_path):
    """The real command in a subprocess: flags, the API key from the environment, a request, Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SPECBRANCH_API_KEY": "env-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "specbranch.cli", "serve", "--target", str(tiny_pair["target"]), "--draft", "none",
         "--precision", "fp32", "--threads", "1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal, even when this suite runs as a background job (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "specbranch serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer env-key"},
                       json={"model": "target", "prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["speculative_metrics"]["engine"] == "ar"  # no draft: ar
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer env-key"},
                       json={"model": "target", "prompt": PROMPT, "max_tokens": 5, "speculative": {"engine": "sd"}})
        assert r.status_code == 400 and "needs a draft" in error_of(r)["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 130 and "Traceback" not in err, err  # graceful stop, then the CLI's Ctrl-C exit
    assert "default engine ar" in err and "API key required" in err
