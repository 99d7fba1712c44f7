"""Baseline: the naive RAG server a team writes first, measured in the same bench run as snaprag.

    python -m bench.baseline --port 0          prints "baseline serving on ADDRESS"

Same proto (Plan / Retrieve / Ask), same knowledge bases, none of snaprag's engineering:
- retrieval is `rank_bm25.BM25Okapi` over every passage, whitespace tokens, scored in the request
  handler on the event loop (what a first version does);
- no budgets, no deadline awareness, no fallback planner: a Plan is the steps of the best-scoring passage
  that has steps, sent as they are (no vocabulary validation, no load / people handling); when no passage
  has steps the plan is empty;
- Ask speaks the top passage's first sentences.
The bench validates every plan it gets back, so the baseline's empty or wrong plans show up as invalid.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
from rank_bm25 import BM25Okapi

from server.config import REPO_ROOT
from server.generate.sentences import split_sentences
from server.knowledge import KnowledgeBase, Passage, load_knowledge_base
from server.proto import pb, pb_grpc

KB_FOLDERS = ("data/kb/voice", "data/kb/warehouse")


def naive_tokens(text: str) -> list[str]:
    return text.lower().split()


class NaiveRetriever:
    def __init__(self, kb: KnowledgeBase) -> None:
        self.passages = kb.passages
        self.bm25 = BM25Okapi([naive_tokens(p.text) for p in kb.passages])

    def top(self, query: str, k: int) -> list[tuple[Passage, float]]:
        scores = self.bm25.get_scores(naive_tokens(query))
        order = np.argsort(-scores)[:k]
        return [(self.passages[i], float(scores[i])) for i in order]


def _param(value: Any) -> pb.ParamValue:
    if isinstance(value, bool | str):
        return pb.ParamValue(text=str(value))
    if isinstance(value, int):
        return pb.ParamValue(integer=value)
    return pb.ParamValue(number=float(value))


def _timing(start: float) -> pb.StageTiming:
    return pb.StageTiming(stage="retrieve", elapsed_ms=(time.perf_counter() - start) * 1000, outcome=pb.OK)


class BaselineService(pb_grpc.AssistantServicer):
    def __init__(self, retriever: NaiveRetriever) -> None:
        self.retriever = retriever

    async def Retrieve(self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext) -> pb.RetrieveResponse:
        t0 = time.perf_counter()
        hits = self.retriever.top(request.query, request.k or 5)
        return pb.RetrieveResponse(
            passages=[pb.ScoredPassage(passage=pb.Passage(id=p.id, text=p.text, intent=p.intent, domain=p.domain,
                                                          locale=p.locale, source=p.source, fault_code=p.fault_code),
                                       score=s, rank=r) for r, (p, s) in enumerate(hits, 1)],
            timings=[_timing(t0)], total_ms=(time.perf_counter() - t0) * 1000)

    async def Plan(self, request: pb.PlanRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        t0 = time.perf_counter()
        query = " ".join(x for x in (request.fault_code, request.task, request.state) if x)
        steps: list[pb.PlanStep] = []
        cite: list[pb.Citation] = []
        for p, _ in self.retriever.top(query, 10):
            if p.steps:
                steps = [pb.PlanStep(action=str(s.get("action", "")),
                                     params={k: _param(v) for k, v in dict(s.get("params", {})).items()})
                         for s in p.steps]
                cite = [pb.Citation(marker=1, passage_id=p.id, source=p.source)]
                break
        timing = _timing(t0)
        return pb.PlanResponse(steps=steps, source=pb.RETRIEVED, mode=pb.FULL, citations=cite, timings=[timing],
                               total_ms=timing.elapsed_ms)

    async def Ask(self, request: pb.AskRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AnswerEvent]:
        t0 = time.perf_counter()
        hits = self.retriever.top(request.query, 3)
        timing = _timing(t0)
        sentences = split_sentences(hits[0][0].text)[:3] if hits else ["Sorry, I don't know."]
        for i, s in enumerate(sentences):
            yield pb.AnswerEvent(chunk=pb.AnswerChunk(text=s, index=i))
        total = (time.perf_counter() - t0) * 1000
        yield pb.AnswerEvent(final=pb.AnswerFinal(mode=pb.FULL, timings=[timing], answer_text=" ".join(sentences),
                                                  generator="baseline", total_ms=total))


async def start_baseline(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, str, int]:
    kb = load_knowledge_base([REPO_ROOT / f for f in KB_FOLDERS])
    service = BaselineService(NaiveRetriever(kb))
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_AssistantServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}; pick another --port")
    await server.start()
    return server, f"{host}:{bound}", len(kb)


async def _serve(args: argparse.Namespace) -> None:
    server, address, n = await start_baseline(args.host, args.port)
    print(f"baseline serving on {address}  ({n} passages, rank-bm25, no budgets, no fallback)", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    ap.add_argument("--port", type=int, default=0, help="port, 0 = any free one (default)")
    args = ap.parse_args(argv)
    import uvloop

    try:
        uvloop.run(_serve(args))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as e:
        print(f"bench.baseline: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
