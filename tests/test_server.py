"""``kernelforge serve`` as a user meets it: the real command in its own
process on a free loopback port, called with OpenAI's own Python client.

The reference for every answer is ``LLM.generate`` in this process, on the
same model with the same settings (one request at a time, so both run the
same batches). Most tests serve the tiny random Llama of
test_runtime_errors.py (with a chat template and one NaN embedding row
added) so they run in seconds; one test serves the default model.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
import httpx2 as httpx  # noqa: E402  (openai's own HTTP client library)

from kernelforge.runtime import LLM, SamplingParams  # noqa: E402
from test_runtime_errors import write_tiny_llama  # noqa: E402

KEY = "sk-test"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
NAN_TEXT = "~"          # nan_dir's model: its embedding row is NaN, so NaN logits follow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m kernelforge.cli serve ...`` until closed; its log is kept for failures."""

    def __init__(self, tmp_path, *args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernelforge.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"the server did not come up:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> dict:
        """The /metrics samples as {name{labels}: value}."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}

    def wait_idle(self, timeout=10.0) -> dict:
        """The metrics once no request runs or waits and no KV block is held."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["kernelforge_requests_running"] == 0 == m["kernelforge_requests_waiting"]
                    and m["kernelforge_kv_blocks_used"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny-serve"), max_position_embeddings=4096)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def nan_dir(tiny_dir, tmp_path_factory):
    """The tiny model with token NAN_TEXT's embedding row NaN."""
    import shutil

    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    path = tmp_path_factory.mktemp("tiny-nan")
    for f in tiny_dir.iterdir():
        shutil.copy(f, path / f.name)
    w = load_file(str(path / "model.safetensors"))
    bad, = Tokenizer.from_file(str(path / "tokenizer.json")).encode(NAN_TEXT).ids
    w["model.embed_tokens.weight"][bad] = float("nan")
    save_file(w, str(path / "model.safetensors"))
    return path


ENGINE = ["--backend", "eager", "--dtype", "float32", "--kv-cache-blocks", "512",
          "--served-model-name", "tiny"]


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(tiny_dir, backend="eager", dtype="float32", num_blocks=512, max_num_seqs=64)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    # 16 running at most: the 64-stream test also queues, and fewer decode graphs are captured
    s = Server(tmp_path_factory.mktemp("logs"), "--model", str(tiny_dir), *ENGINE,
               "--api-key", KEY, "--max-num-seqs", "16")
    yield s
    s.close()


def _reference(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(temperature=0, **kw))[0]


def _stream_text(stream, chat):
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += (c.delta.content or "") if chat else c.text
            finish = c.finish_reason or finish
    return text, finish, usage


def test_completions_and_chat_match_llm_generate(server, tiny_llm):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "The quick brown fox"
    ref = _reference(tiny_llm, prompt, max_tokens=20)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert got.choices[0].text == ref.text and got.choices[0].finish_reason == ref.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        len(ref.prompt_token_ids), len(ref.token_ids))
    text, finish, usage = _stream_text(client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}), chat=False)
    assert (text, finish, usage.completion_tokens) == (ref.text, ref.finish_reason, 20)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ref = _reference(tiny_llm, tiny_llm.chat_prompt(messages), max_tokens=16)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                         temperature=0)
    assert got.choices[0].message.content == ref.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    text, finish, usage = _stream_text(client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}), chat=True)
    assert (text, finish, usage.total_tokens) == (ref.text, "length",
                                                  len(ref.prompt_token_ids) + 16)


def test_stop_strings_logprobs_and_seeded_sampling(server, tiny_llm):
    client = server.client()
    prompt = "abc"
    full = _reference(tiny_llm, prompt, max_tokens=40).text
    stop = full[12:14]                      # a string the greedy text reaches
    ref = _reference(tiny_llm, prompt, max_tokens=40, stop=[stop], logprobs=3)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                    stop=[stop], logprobs=3).choices[0]
    assert got.text == ref.text == full[:full.find(stop)] and got.finish_reason == "stop"
    lp = got.logprobs
    assert lp.token_logprobs == pytest.approx([v for v, _ in ref.logprobs], abs=1e-6)
    assert [len(t) for t in lp.top_logprobs] == [3] * len(ref.logprobs)
    text, _, _ = _stream_text(client.completions.create(
        model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True),
        chat=False)
    assert text == ref.text                 # a stop string split across tokens never leaks
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(chat) == 5 and all(len(t.top_logprobs) == 2 for t in chat)
    seeded = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=12)
    ref = tiny_llm.generate([prompt], SamplingParams(**seeded))[0]
    got = client.completions.create(model="tiny", prompt=prompt, extra_body={"top_k": 0},
                                    **seeded).choices[0]
    assert got.text == ref.text


BAD = [  # (body fields, status, param, words in the message)
    (dict(temperature=-1), 400, "temperature", ">= 0"),
    (dict(temperature="hot"), 400, "temperature", "number"),
    (dict(top_p=0), 400, "top_p", "(0, 1]"),
    (dict(top_p=1e-50), 200, None, None),             # valid: tiny but > 0 in float64
    (dict(max_tokens=0), 400, "max_tokens", ">= 1"),
    (dict(max_tokens=5000), 400, "max_tokens", "maximum context length"),
    (dict(n=2), 400, "n", "n=1"),
    (dict(presence_penalty=3), 400, "presence_penalty", "[-2, 2]"),
    (dict(extra_body={"repetition_penalty": 1e39}), 400, "repetition_penalty", "float32"),
    (dict(extra_body={"top_k": 2 ** 63}), 200, None, None),   # any int keeps every token
    (dict(extra_body={"top_k": -2 ** 63}), 200, None, None),
    (dict(extra_body={"min_p": 2}), 400, "min_p", "[0, 1]"),
    (dict(seed=2 ** 80), 200, None, None),                    # folded into int64
    (dict(stop=[""]), 400, "stop", "non-empty"),
    (dict(logprobs=21), 400, "logprobs", "[0, 20]"),
    (dict(logit_bias={"1": 5}), 400, "logit_bias", "not supported"),
    (dict(prompt="x" * 4100), 400, "prompt", "max_model_len"),
    (dict(prompt=[]), 400, "prompt", "empty"),
    (dict(prompt=[10 ** 9]), 400, "prompt", "vocabulary"),
    (dict(model="gpt-4"), 404, "model", "does not exist"),
]


@pytest.mark.parametrize("fields,status,param,words", BAD,
                         ids=[f"{i}-{s}" for i, (_, s, _, _) in enumerate(BAD)])
def test_bad_requests_get_their_status_and_name_the_field(server, fields, status, param, words):
    body = dict(model="tiny", prompt="hello", max_tokens=2, temperature=0)
    body.update(fields)
    client = server.client()
    if status == 200:
        out = client.completions.create(**body)
        assert out.choices[0].finish_reason in ("length", "stop")
        return
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**body)
    e = info.value
    assert e.status_code == status and e.param == param and words in e.message, e.message


def test_auth_json_errors_and_nan_json(server):
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    head = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/completions"
    # Python's JSON reader takes NaN; the parameter checks refuse it by name
    r = httpx.post(url, headers=head, content='{"prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url, headers=head, content="{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", headers=head,
                   content=json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(server.url + "/v1/nowhere", headers=head)
    assert r.status_code == 404 and "error" in r.json()


def test_nan_logits_fail_that_request_only(nan_dir, tmp_path):
    """A request whose logits turn NaN gets a 500 naming why (non-streamed) or an
    error event (streamed); a request running beside it is untouched."""
    server = Server(tmp_path, "--model", str(nan_dir), *ENGINE, "--api-key", KEY)
    try:
        _nan_requests(server, LLM(nan_dir, backend="eager", dtype="float32", num_blocks=64))
    finally:
        server.close()


def _nan_requests(server, nan_llm):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        good = client.completions.create(model="tiny", prompt="fine", max_tokens=30,
                                         temperature=0)
        bad = client.completions.create(model="tiny", prompt="x" + NAN_TEXT, max_tokens=30,
                                        temperature=0)
        return await asyncio.gather(good, bad, return_exceptions=True)
    good, bad = asyncio.run(go())
    ref = _reference(nan_llm, "fine", max_tokens=30)
    assert ref.finish_reason == "length" and good.choices[0].text == ref.text
    assert isinstance(bad, openai.InternalServerError) and "NaN" in bad.message
    with pytest.raises(openai.APIError, match="NaN"):
        _stream_text(server.client().completions.create(
            model="tiny", prompt=NAN_TEXT, max_tokens=5, stream=True), chat=False)
    m = server.wait_idle()
    assert m["kernelforge_kv_blocks_used"] == 0
    assert m['kernelforge_requests_finished_total{reason="error"}'] >= 2


def test_client_disconnect_mid_stream_frees_its_blocks(server):
    client = server.client()
    before = server.metrics().get('kernelforge_requests_finished_total{reason="abort"}', 0)
    stream = client.completions.create(model="tiny", prompt="a long one", max_tokens=3000,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.metrics()["kernelforge_kv_blocks_used"] > 0
    stream.close()
    m = server.wait_idle(timeout=5)
    assert m["kernelforge_kv_blocks_used"] == 0 and m["kernelforge_requests_running"] == 0
    assert m['kernelforge_requests_finished_total{reason="abort"}'] == before + 1


def test_64_concurrent_streams_all_complete(server):
    async def one(client, i):
        stream = await client.completions.create(
            model="tiny", prompt=f"request {i}: " + "word " * (i % 13), max_tokens=8 + i % 9,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                text, finish = text + c.text, c.finish_reason or finish
        return finish, usage.completion_tokens

    async def go():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                    timeout=120)
        return await asyncio.gather(*(one(client, i) for i in range(64)))
    results = asyncio.run(go())
    assert results == [("length", 8 + i % 9) for i in range(64)]
    assert server.wait_idle()["kernelforge_kv_blocks_used"] == 0


def test_backpressure_timeouts_and_sigterm_drain(tiny_dir, tmp_path):
    """One running request, two waiting: a fourth gets 503 with Retry-After;
    requests past --request-timeout end with a timeout error and free their
    blocks; on SIGTERM a stream in flight still finishes, then the process exits."""
    s = Server(tmp_path, "--model", str(tiny_dir), *ENGINE, "--max-num-seqs", "1",
               "--max-waiting", "2", "--request-timeout", "8")
    try:
        client = s.client()
        long = dict(model="tiny", prompt="p", max_tokens=4000, temperature=0,
                    extra_body={"ignore_eos": True})

        async def go():
            c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            tasks = [asyncio.ensure_future(c.completions.create(**long)) for _ in range(3)]
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(s.metrics))["kernelforge_requests_waiting"] < 2:
                assert time.monotonic() < deadline, "the requests never queued"
                await asyncio.sleep(0.05)
            try:
                await c.completions.create(**long)
            except openai.APIStatusError as e:
                busy = e
            return busy, await asyncio.gather(*tasks, return_exceptions=True)
        busy, timed_out = asyncio.run(go())
        assert busy.status_code == 503 and int(busy.response.headers["Retry-After"]) >= 1
        assert all(isinstance(e, openai.APIStatusError) and e.status_code == 504
                   for e in timed_out), timed_out
        assert s.wait_idle()["kernelforge_kv_blocks_used"] == 0

        stream = client.completions.create(model="tiny", prompt="drain", max_tokens=60,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True})
        first = next(iter(stream))
        s.proc.send_signal(signal.SIGTERM)
        text, finish, usage = _stream_text(stream, chat=False)
        assert first.choices and finish == "length" and usage.completion_tokens == 60
        # uvicorn re-raises the signal once drained, so the exit says "ended by SIGTERM"
        assert s.proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.close()


def test_default_model_serves_what_llm_generates(tmp_path):
    """The default model (SmolLM2-135M-Instruct, bfloat16) through the chat
    template: the served greedy text is LLM.generate's."""
    from kernelforge.runtime import default_model_path
    try:
        default_model_path()
    except (FileNotFoundError, RuntimeError) as e:
        pytest.skip(f"the default model is not installed: {e}")
    s = Server(tmp_path, "--dtype", "bfloat16", "--kv-cache-blocks", "256")
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        got = s.client().chat.completions.create(model="SmolLM2-135M-Instruct",
                                                 messages=messages, max_tokens=24, temperature=0)
    finally:
        s.close()
    llm = LLM(dtype="bfloat16", num_blocks=256)
    ref = _reference(llm, llm.chat_prompt(messages), max_tokens=24)
    assert got.choices[0].message.content == ref.text and "Paris" in ref.text
    assert got.usage.completion_tokens == len(ref.token_ids)
