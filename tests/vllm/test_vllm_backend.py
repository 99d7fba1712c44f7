"""The `vllm` backend against a real vLLM server (tiny seeded Llama + LoRA "voice", see conftest.py).

Failure paths that would need a second vLLM are made with cheap stand-ins in front of the shared one: a
TCP forwarder that can be killed (a replica dying: pooled connections reset, new connects refused), a
closed port, and a canned HTTP stub for 5xx and broken streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from server.config import VllmConfig
from server.generate.backend import (
    BackendError,
    BackendRejected,
    BackendServerError,
    BackendUnavailable,
    ChatMessage,
    DecodeLimits,
    Prompt,
    TextDelta,
    guarded,
)
from server.generate.vllm import VllmBackend, render_completion_prompt
from server.generate.vllm_launcher import free_port
from tests.vllm.conftest import VllmServer

pytestmark = pytest.mark.slow

SYSTEM = ChatMessage("system", "Answer from the passages in one short sentence.")
QUESTIONS = (
    "How do I reset the Lumo Echo Hub?",
    "Why is the light ring flashing blue?",
    "What does fault E42 on the forklift mean?",
    "Where should the hub be placed for the best voice pickup?",
    "How long does a pallet jack battery charge take?",
    "Can the Hub Mini run from a laptop USB port?",
)
PLAN_SCHEMA = {
    "type": "object",
    "properties": {"action": {"enum": ["stop", "go", "wait"]}, "speed": {"type": "integer", "minimum": 0,
                                                                      "maximum": 9}},
    "required": ["action", "speed"],
    "additionalProperties": False,
}
VOICE_FIRST_TOKEN_S = 0.3  # the voice profile's first_token_ms
LONG = 4000  # tokens: many seconds of decoding, so a request closed early cannot have finished already


def messages(i: int = 0) -> tuple[ChatMessage, ...]:
    return (SYSTEM, ChatMessage("user", QUESTIONS[i % len(QUESTIONS)]))


def limits(max_tokens: int = 24, *, first_token_s: float = 10.0, stall_s: float = 5.0, **kw: object) -> DecodeLimits:
    """Generous deadlines unless a test is about them: two cores also run the test process."""
    return DecodeLimits(max_tokens=max_tokens, first_token_s=first_token_s, stall_s=stall_s, **kw)  # type: ignore[arg-type]


async def collect(backend: VllmBackend, msgs: Sequence[ChatMessage], *, model: str, adapter: str | None = None,
                  lim: DecodeLimits | None = None) -> list[TextDelta]:
    lim = lim or limits()
    return [d async for d in guarded(backend.stream(Prompt(tuple(msgs)), lim, model=model, adapter=adapter), lim)]


def text(deltas: Sequence[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[..., VllmBackend]]:
    made: list[VllmBackend] = []

    def make(endpoints: Sequence[str], api: str = "completions", **kw: object) -> VllmBackend:
        backend = VllmBackend(VllmConfig(endpoints=list(endpoints), api=api, **kw))  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


@pytest.fixture(scope="module")
def reference(vllm_server: VllmServer) -> Callable[[Sequence[ChatMessage], int, bool], str]:
    """Greedy text from transformers (+ peft for the adapter), in process, on the completions prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    base = AutoModelForCausalLM.from_pretrained(vllm_server.model_dir).eval()
    model = PeftModel.from_pretrained(base, vllm_server.adapter_dir).eval()

    def greedy(msgs: Sequence[ChatMessage], max_tokens: int, adapter: bool) -> str:
        enc = tok(render_completion_prompt(msgs), return_tensors="pt")
        with torch.no_grad(), (contextlib.nullcontext() if adapter else model.disable_adapter()):
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)

    return greedy


# -- streaming and correctness ------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_the_stream_arrives_in_several_chunks(vllm_server: VllmServer, make_backend, api: str) -> None:
    backend = make_backend([vllm_server.base_url], api=api)
    deltas = await collect(backend, messages(), model=vllm_server.model, lim=limits(max_tokens=32))
    assert len([d for d in deltas if d.text]) >= 4, deltas
    # vLLM's per-chunk usage makes the token count exact (the tiny model never emits EOS).
    assert sum(d.tokens for d in deltas) == 32
    assert text(deltas).strip()


async def test_the_adapter_changes_the_tokens(vllm_server: VllmServer, make_backend) -> None:
    backend = make_backend([vllm_server.base_url])
    base = text(await collect(backend, messages(), model=vllm_server.model))
    tuned = text(await collect(backend, messages(), model=vllm_server.model, adapter=vllm_server.adapter))
    assert base != tuned


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
async def test_greedy_tokens_equal_the_transformers_reference(vllm_server: VllmServer, make_backend, reference,
                                                              adapter: bool) -> None:
    backend = make_backend([vllm_server.base_url])
    for i in range(2):
        got = text(await collect(backend, messages(i), model=vllm_server.model,
                                 adapter=vllm_server.adapter if adapter else None))
        assert got == reference(messages(i), 24, adapter), f"prompt {i}"


async def test_concurrent_mixed_base_and_adapter_requests_stay_correct(vllm_server: VllmServer,
                                                                       make_backend) -> None:
    backend = make_backend([vllm_server.base_url])
    jobs = [(i, vllm_server.adapter if i % 2 else None) for i in range(6)]
    sequential = [text(await collect(backend, messages(i), model=vllm_server.model, adapter=a)) for i, a in jobs]
    concurrent = await asyncio.gather(*(collect(backend, messages(i), model=vllm_server.model, adapter=a)
                                        for i, a in jobs))
    assert [text(c) for c in concurrent] == sequential


async def test_stop_strings_end_the_stream(vllm_server: VllmServer, make_backend) -> None:
    backend = make_backend([vllm_server.base_url])
    full = text(await collect(backend, messages(), model=vllm_server.model))
    stop = full[len(full) // 2:][:4]
    cut = text(await collect(backend, messages(), model=vllm_server.model, lim=limits(stop=(stop,))))
    assert cut == full[: full.index(stop)]


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_a_json_schema_constrains_the_output(vllm_server: VllmServer, make_backend, api: str) -> None:
    backend = make_backend([vllm_server.base_url], api=api)
    for adapter in (None, vllm_server.adapter):
        out = json.loads(text(await collect(backend, messages(2), model=vllm_server.model, adapter=adapter,
                                            lim=limits(max_tokens=48, json_schema=PLAN_SCHEMA))))
        assert set(out) == {"action", "speed"}, out
        assert out["action"] in {"stop", "go", "wait"} and isinstance(out["speed"], int)
        assert 0 <= out["speed"] <= 9


async def test_start_probes_endpoints_and_finds_the_base_model(vllm_server: VllmServer, make_backend) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    backend = make_backend([dead, vllm_server.base_url + "/v1"])
    await backend.start()
    assert backend.healthy_endpoints() == [vllm_server.base_url]
    assert backend.base_model == vllm_server.model
    assert text(await collect(backend, messages(), model=""))  # "" = the served base model


async def test_an_unknown_adapter_is_rejected_with_vllms_message(vllm_server: VllmServer, make_backend) -> None:
    backend = make_backend([vllm_server.base_url])
    with pytest.raises(BackendRejected, match="does not exist"):
        await collect(backend, messages(), model=vllm_server.model, adapter="no-such-adapter")
    assert backend.healthy_endpoints() == [vllm_server.base_url]  # a 4xx is not the replica's fault


# -- cancellation -------------------------------------------------------------------------------------


def _aborts(server: VllmServer) -> int:
    # vLLM counts a client disconnect nowhere in /metrics (an internal abort is not a finished request)
    # and its running gauge is refreshed lazily, so the evidence is the engine's own log line, written
    # when --enable-log-requests is on (conftest.py turns it on).
    return len(re.findall(r"Request \S+ aborted\.", server.log_path.read_text(errors="replace")))


async def _assert_aborted(server: VllmServer, before: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while _aborts(server) <= before:
        assert time.monotonic() < deadline, (f"vLLM logged no abort within {within_s} s: did the request finish "
                                             f"before the close? ({server.log_path})")
        await asyncio.sleep(0.05)


async def test_closing_the_stream_aborts_the_vllm_request(vllm_server: VllmServer, make_backend) -> None:
    backend = make_backend([vllm_server.base_url])
    before = _aborts(vllm_server)
    lim = limits(max_tokens=LONG)
    stream = guarded(backend.stream(Prompt(messages()), lim, model=vllm_server.model), lim)
    got: list[object] = []
    # Random weights may emit a run of byte tokens that vLLM's detokenizer holds back until they form
    # UTF-8 (seen once in CI: the engine decoding at 224 tok/s, no text streamed for 10 s). The request
    # is running either way; what this test is about is that closing the stream aborts it.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3.0):
            while len(got) < 3:
                got.append(await anext(stream))
    await stream.aclose()
    await _assert_aborted(vllm_server, before)


async def test_cancelling_the_consumer_aborts_the_vllm_request(vllm_server: VllmServer, make_backend) -> None:
    backend = make_backend([vllm_server.base_url])
    before = _aborts(vllm_server)
    first = asyncio.Event()
    lim = limits(max_tokens=LONG)

    async def consume() -> None:
        async for _ in guarded(backend.stream(Prompt(messages(1)), lim, model=vllm_server.model,
                                              adapter=vllm_server.adapter), lim):
            first.set()

    task = asyncio.create_task(consume())
    with contextlib.suppress(TimeoutError):  # see the test above: text may lag the running request
        await asyncio.wait_for(first.wait(), 3.0)
    task.cancel()  # what a cancelled gRPC call does to the handler
    with pytest.raises(asyncio.CancelledError):
        await task
    await _assert_aborted(vllm_server, before)


# -- dead replicas, round-robin, server errors --------------------------------------------------------


class TcpForwarder:
    """127.0.0.1:port -> the shared vLLM. `kill()` resets every connection and stops listening, as a
    crashed replica would; `start()` again on the same port is the replica coming back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TcpForwarder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def kill(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, count=True), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool = False) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if count:
                    self.requests += data.count(b"POST /v1/")
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)


async def test_a_killed_replica_fails_fast_and_comes_back(vllm_server: VllmServer, make_backend) -> None:
    replica = await TcpForwarder(vllm_server.port).start()
    backend = make_backend([replica.url])
    assert text(await collect(backend, messages(), model=vllm_server.model))  # a pooled connection is open
    await replica.kill()

    lim = limits(first_token_s=VOICE_FIRST_TOKEN_S)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await collect(backend, messages(), model=vllm_server.model, lim=lim)
    elapsed = time.monotonic() - started
    assert elapsed < VOICE_FIRST_TOKEN_S, f"took {elapsed * 1000:.0f} ms: the policy could not fall back in time"
    assert backend.healthy_endpoints() == []

    # Restarted: tried again although still inside its eject window, since no endpoint is healthy.
    await replica.start()
    assert text(await collect(backend, messages(), model=vllm_server.model))
    assert backend.healthy_endpoints() == [replica.url]
    await replica.kill()


async def test_a_replica_dying_mid_stream_raises_unavailable(vllm_server: VllmServer, make_backend) -> None:
    replica = await TcpForwarder(vllm_server.port).start()
    backend = make_backend([replica.url])
    before = _aborts(vllm_server)
    lim = limits(max_tokens=LONG)
    stream = guarded(backend.stream(Prompt(messages()), lim, model=vllm_server.model), lim)
    await anext(stream)
    await replica.kill()
    with pytest.raises(BackendUnavailable, match="broke"):
        async for _ in stream:
            pass
    await _assert_aborted(vllm_server, before)  # the server saw the drop too


async def test_a_closed_port_raises_unavailable_at_once(make_backend) -> None:
    backend = make_backend([f"http://127.0.0.1:{free_port()}"])
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="no vLLM endpoint reachable"):
        await collect(backend, messages(), model="any", lim=limits(first_token_s=VOICE_FIRST_TOKEN_S))
    assert time.monotonic() - started < VOICE_FIRST_TOKEN_S


async def test_round_robin_spreads_calls_and_skips_a_dead_replica(vllm_server: VllmServer, make_backend) -> None:
    a, b = await TcpForwarder(vllm_server.port).start(), await TcpForwarder(vllm_server.port).start()
    dead = f"http://127.0.0.1:{free_port()}"
    # A long ejection: on a loaded machine the six calls may take longer than the default 5 s.
    backend = make_backend([dead, a.url, b.url], eject_s=120.0)
    answers = [text(await collect(backend, messages(), model=vllm_server.model)) for _ in range(6)]
    assert all(answers), answers  # every call served
    assert (a.requests, b.requests) == (3, 3)
    assert backend.healthy_endpoints() == [a.url, b.url]
    await a.kill()
    await b.kill()


async def _http_stub(*responses: bytes | None) -> tuple[asyncio.Server, str]:
    """An HTTP/1.1 server answering the n-th connection with the n-th response (the last one repeats),
    then closing it. None closes the connection without answering."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        response = responses[min(served, len(responses) - 1)]
        served += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"content-length:\s*(\d+)", head, flags=re.I)
        if length:
            await reader.readexactly(int(length.group(1)))
        if response is not None:
            writer.write(response)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _sse(*events: str) -> bytes:
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body


_CHUNK = json.dumps({"choices": [{"index": 0, "text": "hello"}]})
_ERROR_500 = json.dumps({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})


@pytest.mark.parametrize(("response", "error", "match"), [
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: "
     + str(len(_ERROR_500)).encode() + b"\r\nConnection: close\r\n\r\n" + _ERROR_500.encode(),
     BackendServerError, "HTTP 500: engine died"),
    (_sse(_CHUNK, "{not json"), BackendServerError, "malformed"),
    (_sse(_CHUNK, _ERROR_500, "[DONE]"), BackendServerError, "engine died"),
    (_sse(_CHUNK), BackendServerError, "without \\[DONE\\]"),
], ids=["http-500", "malformed-event", "error-event", "no-done"])
async def test_server_errors_raise_server_error(make_backend, response: bytes, error: type[BackendError],
                                                match: str) -> None:
    server, url = await _http_stub(response)
    try:
        backend = make_backend([url])
        with pytest.raises(error, match=match):
            await collect(backend, messages(), model="m")
    finally:
        server.close()


async def test_a_5xx_ejects_the_replica_and_chunks_without_usage_count_one_token(make_backend) -> None:
    failing, failing_url = await _http_stub(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                            b"Connection: close\r\n\r\n")
    ok, ok_url = await _http_stub(_sse(_CHUNK, _CHUNK, "[DONE]"))
    try:
        backend = make_backend([failing_url, ok_url])
        with pytest.raises(BackendServerError, match="503"):
            await collect(backend, messages(), model="m")
        assert backend.healthy_endpoints() == [ok_url]
        deltas = await collect(backend, messages(), model="m")
        assert [(d.text, d.tokens) for d in deltas] == [("hello", 1), ("hello", 1)]
    finally:
        failing.close()
        ok.close()


async def test_a_connection_dropped_before_any_answer_is_retried_once(make_backend) -> None:
    # What a pooled keep-alive connection looks like when the server closed it just as it was reused.
    server, url = await _http_stub(None, _sse(_CHUNK, "[DONE]"))
    try:
        backend = make_backend([url])
        assert text(await collect(backend, messages(), model="m")) == "hello"
        assert backend.healthy_endpoints() == [url]
    finally:
        server.close()
