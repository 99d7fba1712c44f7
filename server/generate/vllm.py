"""The `vllm` text backend: a streaming client for vLLM's OpenAI-compatible API.

One `httpx.AsyncClient` is shared by every call. vLLM's API server is uvicorn, which speaks HTTP/1.1
only, so the win is keep-alive pooling (no TCP handshake per call), not HTTP/2 multiplexing. There is no
read timeout: `guarded()` owns the first-token and stall deadlines and closes the stream when they pass.
Closing the stream closes the HTTP response, hence its connection; vLLM sees the disconnect and aborts
the request, so a barge-in frees the GPU/CPU at once instead of decoding to max_tokens.

LoRA adapters are chosen per request by the `model` field: vLLM serves each `--lora-modules NAME=DIR`
under NAME, next to the base model.

Replicas: calls go round-robin over the endpoints that are not ejected. A connect failure, a reset, a
5xx or a broken stream ejects an endpoint for `eject_s`. A failure before any answer (refused, connect
timeout, reset) moves the call on to the next endpoint: generation has no side effects and the server
did no work we could use. A 5xx, a 4xx or a broken stream is raised for the policy to fall back. When
every endpoint is ejected, the one that failed longest ago is tried anyway: a restarted replica must
come back without waiting for a health checker we don't have.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httpx

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
)

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
_PROBE_READ_S = 2.0
_CLOSE_S = 2.0
_KEEPALIVE_S = 4.0
_ERROR_BODY_CHARS = 500


def render_completion_prompt(messages: Sequence[ChatMessage]) -> str:
    """The prompt the `completions` api sends: each message as `<|role|>`, newline, content, newline;
    then `<|assistant|>` and a newline, where the model continues. For example

        <|system|>
        Answer from the passages.
        <|user|>
        How do I reset the hub?
        <|assistant|>

    A plain, model-neutral template: use the `chat` api to get the served model's own chat template.
    The server's tokenizer adds its BOS token, as for any completion prompt."""
    parts = [f"<|{m.role}|>\n{m.content}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


@dataclass(slots=True)
class Endpoint:
    url: str
    down_until: float = 0.0
    failed_at: float = 0.0
    """Monotonic time of the last failure (0 = never failed)."""
    last_error: str = ""


class EndpointPool:
    """Health-aware round-robin over replica base URLs."""

    def __init__(self, urls: Sequence[str], eject_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = [Endpoint(normalize_url(u)) for u in urls]
        self._eject_s = eject_s
        self._clock = clock
        self._next = 0

    def candidates(self) -> list[Endpoint]:
        """Endpoints to try for one call, in order: the healthy ones starting at the round-robin cursor;
        if none is healthy, the one that failed longest ago."""
        if not self.endpoints:
            return []
        now = self._clock()
        healthy = [e for e in self.endpoints if e.down_until <= now]
        if not healthy:
            return [min(self.endpoints, key=lambda e: e.failed_at)]
        # The cursor walks the healthy list, not all endpoints, so an ejected replica's turns are shared
        # evenly instead of all going to its neighbour.
        start = self._next % len(healthy)
        self._next += 1
        return healthy[start:] + healthy[:start]

    def mark_down(self, endpoint: Endpoint, reason: str) -> None:
        now = self._clock()
        if endpoint.down_until <= now:
            log.warning("vllm endpoint %s ejected for %.1f s: %s", endpoint.url, self._eject_s, reason)
        endpoint.down_until = now + self._eject_s
        endpoint.failed_at = now
        endpoint.last_error = reason

    def mark_up(self, endpoint: Endpoint) -> None:
        if endpoint.failed_at and endpoint.down_until:
            log.info("vllm endpoint %s is back", endpoint.url)
        endpoint.down_until = 0.0
        endpoint.last_error = ""

    def healthy(self) -> list[str]:
        now = self._clock()
        return [e.url for e in self.endpoints if e.down_until <= now]


def normalize_url(url: str) -> str:
    """`http://host:8000/`, `http://host:8000/v1` -> `http://host:8000` (OpenAI clients are often given
    the /v1 base)."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class VllmBackend:
    """`TextBackend` over one or more vLLM OpenAI-compatible servers (see the module docstring)."""

    name = "vllm"

    def __init__(self, cfg: VllmConfig) -> None:
        self._cfg = cfg
        self._pool = EndpointPool(cfg.endpoints, cfg.eject_s)
        self._client: httpx.AsyncClient | None = None
        self._base_model: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every endpoint; mark the unreachable ones down (logged, never raised: the policy falls
        back while they are down) and learn the base model name from the first that answers."""
        results = await asyncio.gather(*(self._probe(e) for e in self._pool.endpoints))
        for models in results:
            if models is not None and self._base_model is None:
                self._base_model = _base_model_id(models)
        log.info("vllm backend: %d/%d endpoint(s) healthy%s", len(self.healthy_endpoints()),
                 len(self._pool.endpoints), f", base model {self._base_model!r}" if self._base_model else "")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing must never take the shutdown down with it
                async with asyncio.timeout(_CLOSE_S):
                    await client.aclose()

    def healthy_endpoints(self) -> list[str]:
        """Base URLs currently in the rotation (for health and reporting)."""
        return self._pool.healthy()

    @property
    def base_model(self) -> str | None:
        """The served base model id, once discovered (None before)."""
        return self._base_model

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            cfg = self._cfg
            n = max(1, len(self._pool.endpoints))
            headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
            self._client = httpx.AsyncClient(
                http2=False,  # uvicorn (vLLM's server) is HTTP/1.1: keep-alive is what we get
                headers=headers,
                timeout=httpx.Timeout(connect=cfg.connect_timeout_s, read=None, write=5.0, pool=5.0),
                # Idle connections are dropped before vLLM's own 5 s keep-alive timeout
                # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE) closes them under us.
                limits=httpx.Limits(max_connections=cfg.max_connections * n,
                                    max_keepalive_connections=cfg.max_connections * n,
                                    keepalive_expiry=_KEEPALIVE_S),
            )
        return self._client

    async def _probe(self, endpoint: Endpoint) -> list[dict[str, Any]] | None:
        try:
            resp = await self._http().get(endpoint.url + MODELS_PATH, timeout=httpx.Timeout(
                _PROBE_READ_S, connect=self._cfg.connect_timeout_s))
            resp.raise_for_status()
            models = resp.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            self._pool.mark_down(endpoint, f"probe failed: {_describe(e)}")
            return None
        self._pool.mark_up(endpoint)
        return models if isinstance(models, list) else []

    async def _model_name(self, model: str, adapter: str | None) -> str:
        if adapter:
            return adapter
        if model:
            return model
        if self._base_model is None:
            for endpoint in self._pool.candidates():
                models = await self._probe(endpoint)
                if models is not None:
                    self._base_model = _base_model_id(models)
                    break
        if not self._base_model:
            raise BackendUnavailable("no vLLM endpoint answered GET /v1/models to name the base model")
        return self._base_model

    # -- streaming ---------------------------------------------------------------------------------

    async def stream(self, prompt: Prompt, limits: DecodeLimits, *, model: str,
                     adapter: str | None = None) -> AsyncIterator[TextDelta]:
        name = await self._model_name(model, adapter)
        path, body = self.request_body(prompt, limits, name)
        endpoint, response = await self._open(path, body)
        try:
            async with contextlib.aclosing(self._deltas(response, chat=path == CHAT_PATH,
                                                        endpoint=endpoint)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            # Closing mid-stream drops the connection: that is vLLM's signal to abort the request.
            await response.aclose()

    def request_body(self, prompt: Prompt, limits: DecodeLimits, model: str) -> tuple[str, dict[str, Any]]:
        """The endpoint path and JSON body for one call (public for tests and debugging)."""
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "max_tokens": limits.max_tokens,
            "temperature": limits.temperature,
            # Cumulative completion_tokens on every chunk, so TextDelta.tokens is exact even when vLLM
            # batches several tokens into one chunk.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if limits.stop:
            body["stop"] = list(limits.stop)
        if limits.json_schema is not None:
            # The OpenAI form; vLLM turns it into its structured-outputs `json` constraint (xgrammar).
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": _plain(limits.json_schema)}}
        if self._cfg.api == "chat":
            body["messages"] = [{"role": m.role, "content": m.content} for m in prompt.messages]
            return CHAT_PATH, body
        body["prompt"] = render_completion_prompt(prompt.messages)
        return COMPLETIONS_PATH, body

    async def _open(self, path: str, body: dict[str, Any]) -> tuple[Endpoint, httpx.Response]:
        client = self._http()
        candidates = self._pool.candidates()
        if not candidates:
            raise BackendUnavailable("no vLLM endpoints configured ([generation.vllm].endpoints)")
        failures = []
        for endpoint in candidates:
            try:
                response = await self._send(client, endpoint.url + path, body)
            except httpx.PoolTimeout as e:
                raise BackendUnavailable(f"vLLM connection pool exhausted ({_describe(e)})") from e
            except httpx.TransportError as e:
                # Refused, timed out, or reset before any answer: the server did no work for us, so the
                # next replica may take the call.
                self._pool.mark_down(endpoint, _describe(e))
                failures.append(f"{endpoint.url}: {_describe(e)}")
                continue
            if response.status_code >= 400:
                message = await _error_message(response)
                if response.status_code >= 500:
                    self._pool.mark_down(endpoint, f"HTTP {response.status_code}")
                    raise BackendServerError(f"{endpoint.url} answered HTTP {response.status_code}: {message}")
                raise BackendRejected(f"vLLM rejected the request (HTTP {response.status_code}): {message}")
            self._pool.mark_up(endpoint)
            return endpoint, response
        raise BackendUnavailable("no vLLM endpoint reachable: " + "; ".join(failures))

    @staticmethod
    async def _send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
        """POST, streaming. A pooled connection that the server closed just as we reused it fails with a
        read/protocol error before any answer: that is retried once, on a fresh connection, before the
        endpoint is blamed."""
        try:
            return await client.send(client.build_request("POST", url, json=body), stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            raise
        except httpx.TransportError:
            return await client.send(client.build_request("POST", url, json=body), stream=True)

    async def _deltas(self, response: httpx.Response, *, chat: bool,
                      endpoint: Endpoint) -> AsyncGenerator[TextDelta, None]:
        """Server-sent events -> TextDeltas. Each event is one `data: {json}` line; `data: [DONE]` ends it."""
        counted = 0
        try:
            # httpx's line iterator is an async generator (typed as an iterator): close it with us.
            lines_gen = cast(AsyncGenerator[str, None], response.aiter_lines())
            async with contextlib.aclosing(lines_gen) as lines:
                async for line in lines:
                    if not line.startswith("data:"):
                        continue  # blank separators, `: comments`, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = _parse_chunk(data)
                    text = _chunk_text(chunk, chat)
                    total = _completion_tokens(chunk)
                    if total is None:
                        tokens = 1 if text else 0
                    else:
                        tokens, counted = max(0, total - counted), max(counted, total)
                    if text or tokens:
                        yield TextDelta(text=text, tokens=tokens)
        except httpx.TransportError as e:
            self._pool.mark_down(endpoint, f"stream broken: {_describe(e)}")
            raise BackendUnavailable(f"vLLM stream from {endpoint.url} broke: {_describe(e)}") from e
        raise BackendServerError(f"vLLM stream from {endpoint.url} ended without [DONE]")


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise BackendServerError(f"malformed vLLM stream event: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise BackendServerError(f"malformed vLLM stream event: {data[:200]!r}")
    error = chunk.get("error")
    if error is not None:
        raise _error_from_body(error)
    return chunk


def _chunk_text(chunk: Mapping[str, Any], chat: bool) -> str:
    choices = chunk.get("choices")
    if not choices:
        return ""  # the usage-only chunk at the end
    try:
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    except (AttributeError, TypeError, IndexError):
        raise BackendServerError(f"malformed vLLM stream chunk: {str(chunk)[:200]}") from None
    if text is not None and not isinstance(text, str):
        raise BackendServerError(f"malformed vLLM stream chunk: {str(chunk)[:200]}")
    return text or ""


def _completion_tokens(chunk: Mapping[str, Any]) -> int | None:
    usage = chunk.get("usage")
    if isinstance(usage, Mapping):
        value = usage.get("completion_tokens")
        if isinstance(value, int):
            return value
    return None


def _error_from_body(error: Any) -> BackendError:
    if isinstance(error, Mapping):
        message = str(error.get("message", error))
        code = error.get("code")
    else:
        message, code = str(error), None
    if isinstance(code, int) and 400 <= code < 500:
        return BackendRejected(f"vLLM rejected the request: {message}")
    return BackendServerError(f"vLLM failed mid-stream: {message}")


async def _error_message(response: httpx.Response) -> str:
    """vLLM's own error text (`{"error": {"message": ...}}`), else the start of the body."""
    try:
        raw = await response.aread()
    except httpx.HTTPError:
        raw = b""
    finally:
        await response.aclose()
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(text)
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    return text[:_ERROR_BODY_CHARS] or response.reason_phrase


def _base_model_id(models: Sequence[Any]) -> str | None:
    """vLLM lists LoRA adapters next to the base model, with `parent` set to the base model's id."""
    ids = [m for m in models if isinstance(m, Mapping) and isinstance(m.get("id"), str)]
    for m in ids:
        if not m.get("parent"):
            return m["id"]
    return ids[0]["id"] if ids else None


def _plain(value: Any) -> Any:
    """Mappings and tuples (a frozen JSON schema) -> dicts and lists that json.dumps accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


__all__ = ["Endpoint", "EndpointPool", "VllmBackend", "normalize_url", "render_completion_prompt"]
