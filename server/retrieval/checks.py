"""Validation of what a retriever returns, before any stage trusts it.

A retriever that returns garbage (NaN or infinite scores, passages the knowledge base does not hold,
more hits than asked for, not hits at all) fails its stage: `InvalidRetrieval` is raised inside the
stage, `run_stage` records FAILED and the caller degrades (fallback planner, rule plan, UNAVAILABLE for
Retrieve), never a crash or UNKNOWN.
"""

from __future__ import annotations

import math
from typing import Any

from server.retrieval.sparse import Filters, Hit


class InvalidRetrieval(ValueError):
    pass


def check_hits(hits: Any, kb: Any, k: int | None = None) -> list[Hit]:
    if not isinstance(hits, list):
        raise InvalidRetrieval(f"retriever returned {type(hits).__name__}, not a list of hits")
    if k is not None and len(hits) > k:
        raise InvalidRetrieval(f"retriever returned {len(hits)} hits for k={k}")
    by_id = getattr(kb, "by_id", None)  # the static knowledge base; the live one checks its own rows
    for i, h in enumerate(hits):
        if not isinstance(h, Hit):
            raise InvalidRetrieval(f"hit {i} is a {type(h).__name__}, not a Hit")
        if not isinstance(h.score, int | float) or not math.isfinite(h.score):
            raise InvalidRetrieval(f"hit {i} has a non-finite score {h.score!r}")
        pid = getattr(h.passage, "id", None)
        if not isinstance(pid, str) or (by_id is not None and pid not in by_id):
            raise InvalidRetrieval(f"hit {i} names an unknown passage id {pid!r}")
    return hits


def checked_search(retriever: Any, kb: Any, query: str, k: int, filters: Filters | None = None,
                   mode: str | None = None) -> list[Hit]:
    """`retriever.search` (blocking, in the CPU pool) with its result validated."""
    hits = retriever.search(query, k, filters) if mode is None else retriever.search(query, k, filters, mode)
    return check_hits(hits, kb, k)
