"""The live index behind the `Runtime.retriever` and `Runtime.kb` the pipelines and validation use.

Existing code keeps calling `rt.retriever.search(query, k, filters[, mode])` and `rt.kb.values(field)`;
each call reads the live view once, so a request's retrieval runs on one consistent view, and a swap
takes effect for the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from server.index.live import LiveIndex
from server.knowledge import Passage
from server.retrieval.hybrid import FusionMode
from server.retrieval.sparse import Filters, Hit


class LiveRetriever:
    name = "hybrid"

    def __init__(self, live: LiveIndex) -> None:
        self.live = live

    @property
    def default_mode(self) -> FusionMode:
        return self.live.view.default_mode

    def modes(self) -> tuple[FusionMode, ...]:
        return self.live.view.modes()

    @property
    def dense(self) -> object | None:
        """What `rt.retriever.dense.encoder` lookups expect (bench/generation.py): the query encoder."""
        return _DenseHandle(self.live.encoder) if self.live.encoder is not None else None

    def search(self, query: str, k: int, filters: Filters | None = None, mode: FusionMode | None = None,
               ) -> list[Hit]:
        """Blocking; called from the CPU pool."""
        return self.live.search(query, k, filters, mode)

    def close(self) -> None:
        self.live.close()


class _DenseHandle:
    def __init__(self, encoder: object) -> None:
        self.encoder = encoder


class LiveKnowledge:
    """The knowledge base as the live view has it now (filter values, counts)."""

    def __init__(self, live: LiveIndex) -> None:
        self.live = live

    def __len__(self) -> int:
        return len(self.live.view)

    def values(self, name: str) -> set[str]:
        return self.live.view.values(name)

    @property
    def passages(self) -> list[Passage]:
        """Live passages in row order (a copy: O(n), for tools and tests, not the request path)."""
        return list(self.live.view.passages())

    @property
    def by_id(self) -> dict[str, int]:
        return {p.id: i for i, p in enumerate(self.live.view.passages())}

    def __iter__(self) -> Iterator[Passage]:
        return self.live.view.passages()


def live_idf_lookup(live: LiveIndex) -> Callable[[str], float]:
    """The extractive generator's term weights, from whichever snapshot is served now."""
    def lookup(term: str) -> float:
        gen = live.view.gen
        i = gen.main_vocab.get(term)
        return float(gen.main.idf[i]) if i is not None else gen.idf_default
    return lookup
