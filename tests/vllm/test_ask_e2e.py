"""The whole Ask gRPC stream carries a real vLLM's answer end to end (policy backend `vllm`), and a dead
vLLM makes Ask answer from the extractive tier inside the voice budget, saying why."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from server.config import Config, GroundingConfig, TaskPolicy, VllmConfig
from server.generate.backend import DecodeLimits, guarded
from server.generate.grounding import strip_markers
from server.generate.policy import complete_sentences
from server.generate.vllm import VllmBackend
from server.proto import pb
from server.runtime import Runtime, build_backends, build_voice_generator
from tests.server.conftest import make_server  # noqa: F401  (fixture)
from tests.vllm.conftest import VllmServer

QUESTION = "how do i reset my smart plug"


def vllm_runtime(runtime: Runtime, config: Config, endpoints: list[str], *, adapter: str = "voice",
                 model: str = "tiny-llama", first_chunk_ms: float = 3000.0) -> tuple[Config, Runtime]:
    """The session runtime with the voice policy on vLLM. The tiny random model cannot write grounded text,
    so the grounding filter is off here (tests/generate covers it) and the first-chunk budget, and retrieval's
    share of it, are wide enough for a loaded 2-core box (vLLM's own process competes for the cores)."""
    voice = dataclasses.replace(config.profiles["voice"], first_chunk_ms=first_chunk_ms, first_token_ms=first_chunk_ms,
                                retrieve_ms=max(config.profiles["voice"].retrieve_ms, first_chunk_ms / 2))
    gen = dataclasses.replace(config.generation, voice=TaskPolicy(backend="vllm", model=model, adapter=adapter,
                                                                  max_tokens=24),
                              grounding=GroundingConfig(enabled=False),
                              vllm=VllmConfig(endpoints=endpoints, api="chat"))
    cfg = dataclasses.replace(config, profiles={**config.profiles, "voice": voice}, generation=gen)
    backends = build_backends(cfg)
    encoder = getattr(getattr(runtime.retriever, "dense", None), "encoder", None)
    generator, prompts = build_voice_generator(cfg, runtime.generator.extractive,  # type: ignore[attr-defined]
                                               backends, runtime.tokenizer, encoder, runtime.cpu)
    return cfg, dataclasses.replace(runtime, cfg=cfg, generator=generator, backends=backends, prompts=prompts)


async def test_ask_stream_carries_vllm_chunks(make_server: Any, runtime: Runtime, config: Config,  # noqa: F811
                                              vllm_server: VllmServer) -> None:
    cfg, rt = vllm_runtime(runtime, config, [vllm_server.base_url])
    _, client = await make_server(cfg=cfg, generator=rt.generator, backends=rt.backends, prompts=rt.prompts)
    events = [ev async for ev in client.ask_stream(QUESTION)]
    chunks = [ev.chunk.text for ev in events if ev.HasField("chunk")]
    final = next(ev.final for ev in events if ev.HasField("final"))
    assert final.generation.backend == "vllm", final.reason
    assert final.generation.adapter == "voice" and final.generation.tokens > 0 and final.generation.ttft_ms > 0
    assert final.mode == pb.FULL and not final.generation.fallback_reason

    # The same prompt straight to vLLM (greedy): the spoken chunks are its text cut into sentences.
    hits = runtime.retriever.search(QUESTION, cfg.profiles["voice"].default_k)
    prompt = rt.prompts.build(QUESTION, hits[: cfg.generation.max_passages])
    backend = VllmBackend(cfg.generation.vllm)
    await backend.start()
    try:
        limits = DecodeLimits(max_tokens=24, first_token_s=30.0, stall_s=30.0)
        text = "".join([d.text async for d in guarded(backend.stream(prompt, limits, model="tiny-llama",
                                                                     adapter="voice"), limits)])
    finally:
        await backend.close()
    sentences, _ = complete_sentences(text, final=True)
    expected = [t for t in (strip_markers(s)[0] for s in sentences) if any(c.isalnum() for c in t)]
    assert chunks == expected[: cfg.generation.max_sentences]


async def test_dead_vllm_falls_back_to_extractive_inside_the_budget(make_server: Any, runtime: Runtime,  # noqa: F811
                                                                    config: Config) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg, rt = vllm_runtime(runtime, config, [dead], first_chunk_ms=800.0)
    _, client = await make_server(cfg=cfg, generator=rt.generator, backends=rt.backends, prompts=rt.prompts)
    t0 = time.perf_counter()
    events = [ev async for ev in client.ask_stream(QUESTION)]
    final = next(ev.final for ev in events if ev.HasField("final"))
    assert final.generator == "extractive" and final.mode == pb.DEGRADED
    assert "unavailable" in final.generation.fallback_reason and "answered by the extractive tier" in final.reason
    assert final.first_chunk_ms < 800 and time.perf_counter() - t0 < 2.0
    assert any("press and hold" in ev.chunk.text for ev in events if ev.HasField("chunk"))
