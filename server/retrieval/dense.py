"""Dense nearest-neighbour search: an HNSW graph (hnswlib) over L2-normalised float32 embeddings.

Inner product on unit vectors is cosine similarity, so scores are similarities in [-1, 1], best first.
hnswlib reports the inner-product *distance* 1 - <q, x>; `HnswIndex` converts it back.

Metadata filters are PRE-filters: the allowed rows are known before the search, and
- when few rows are allowed (`<= exact_max_rows`, or under `exact_max_fraction` of the index), the
  search is exact: one matrix-vector product over those rows. That is both faster and exact there:
  a filtered graph search has to walk past every disallowed node to collect `ef` allowed ones, so its
  cost grows like 1 / selectivity (9-25 ms below 2 % on our bench, against well under 1 ms for exact
  search over those rows), and on a fragmented allowed set the walk can come up short of k
  (bench/dense.py measures the cross-over);
- otherwise hnswlib filters inside the graph search (`knn_query(filter=...)`): disallowed nodes are
  still traversed (the graph stays connected) but never returned. Filtering the top-k afterwards would
  return fewer than k results whenever the filter is selective.

The index keeps its own copy of the normalised vectors (n x dim float32, 1.5 KB per 384-d row, the
same size again as the graph's copy) for exact search and references; for the embedded knowledge
bases that is a few MB, for 100k passages 150 MB.

Threads: hnswlib releases the GIL inside `knn_query`, so searches from the server's CPU worker pool
run in parallel. A single query uses `num_threads=1` (spinning up threads costs more than the search);
`search_batch` and `build` use `threads`. A filtered search calls back into Python for each visited
node, holding the GIL for that call; it is still far below the retrieval budget (see bench/RESULTS.md).
`search` is safe to call concurrently; `add`, `mark_deleted`, `ef` changes and `save` are not (hnswlib
does not support searching while inserting): the live index (server/index/live_dense.py) wraps them in
a reader/writer lock so it can add to the serving copy.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import hnswlib
import numpy as np
import numpy.typing as npt

from kernels.topk import top_k

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

DEFAULT_SEED = 100
"""hnswlib's own default level-generator seed."""
EXACT_MAX_ROWS = 4000
"""A filter allowing at most this many rows is served by exact search. Exact costs ~0.35 us per allowed
row (384-d); filtered HNSW costs ~ef / share node visits. Measured cross-over (bench/RESULTS.md, 2
cores): 100k rows at 5 % (4.9k rows) exact 1.7 ms vs graph 2.5 ms; 20k rows at 20 % (3.9k rows)
0.7 ms vs 0.9 ms; at 10 % of 100k (10k rows) the graph wins, 0.9 ms vs 3.6 ms."""
EXACT_MAX_FRACTION = 0.02
"""...as is one allowing under this share of a larger index: below 2 % the filtered graph walk costs
9-25 ms whatever the index size, more than scoring the allowed rows up to ~20k of them."""
GROWTH_HEADROOM = 0.25
"""Capacity reserved beyond the built rows, so `add` rarely has to reallocate the graph."""


def exact_search(matrix: F32, query: F32, k: int, mask: Mask | None = None) -> tuple[I64, F32]:
    """Brute-force inner-product top-k: `matrix @ query`, best first, ties by lower index.

    The reference for every approximate result, and the search used for small filtered sets.
    `mask` (one bool per row) restricts the candidates before selection.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    query = np.asarray(query, dtype=np.float32)
    if matrix.ndim != 2 or query.shape != (matrix.shape[1],):
        raise ValueError(f"query: expected shape ({matrix.shape[-1]},) to match matrix {matrix.shape}, "
                         f"got {query.shape}")
    if mask is not None:
        mask = _check_mask(mask, matrix.shape[0])
        rows = np.flatnonzero(mask)
        if rows.size < matrix.shape[0] // 2:
            # Score only the allowed rows, gathered in L2-sized chunks (no large temporary).
            sims = np.empty(rows.size, np.float32)
            for lo in range(0, rows.size, _GATHER_CHUNK):
                _matvec(matrix[rows[lo:lo + _GATHER_CHUNK]], query, sims[lo:lo + _GATHER_CHUNK])
            sub, scores = top_k(sims, k)
            return rows[sub], scores
    idx, scores = top_k(_matvec(matrix, query, np.empty(matrix.shape[0], np.float32)), k, mask=mask)
    return idx, scores


_GATHER_CHUNK = 1024  # rows per gather: 1024 x 384 float32 = 1.5 MB, stays in cache for the product


def _matvec(matrix: F32, query: F32, out: F32) -> F32:
    # einsum's own SIMD loop, not BLAS: OpenBLAS sgemv wakes its thread pool for anything but tiny
    # products, and on a server whose worker threads already fill the cores that hand-off costs
    # milliseconds (measured 8 ms spikes on 2 cores); single-threaded einsum was also faster here.
    return np.einsum("ij,j->i", matrix, query, out=out)


class HnswIndex:
    """hnswlib HNSW graph, space "ip", labels = row numbers 0..n-1 of the vectors it was built from."""

    def __init__(self, index: hnswlib.Index, vectors: F32, *, threads: int = 0,
                 exact_max_rows: int = EXACT_MAX_ROWS, exact_max_fraction: float = EXACT_MAX_FRACTION) -> None:
        # Use build() or load(); this takes an index whose labels are exactly 0..len(vectors)-1.
        self._index = index
        # `_vectors` is always `_buf[:n]`: `add` appends into spare rows of `_buf` (reallocating it with
        # headroom when full), so a stream of small additions does not copy the whole matrix each time.
        # Rows below n never change, so a view taken earlier stays valid after later additions.
        self._buf = vectors
        self._vectors = vectors
        self._deleted = 0
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        """Threads for build, add and search_batch (0 = one per core)."""
        self.exact_max_rows = exact_max_rows
        self.exact_max_fraction = exact_max_fraction

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def build(cls, vectors: npt.ArrayLike, *, m: int, ef_construction: int, ef: int, threads: int = 0,
              seed: int = DEFAULT_SEED, capacity: int | None = None) -> HnswIndex:
        """Index `vectors` (n x dim; L2-normalised here, zero rows rejected) with labels 0..n-1.

        `m`, `ef_construction`, `ef` are DenseConfig.hnsw_m / hnsw_ef_construction / hnsw_ef.
        `seed` drives hnswlib's level generator. The graph is reproducible only with `threads=1`:
        parallel insertion order depends on thread timing (hnswlib offers no way around it); results
        from any build must still meet the recall test against exact search.
        `capacity` defaults to n plus GROWTH_HEADROOM.
        """
        x = normalize(vectors, name="vectors")
        if m < 2 or ef_construction < 1 or ef < 1:
            raise ValueError(f"m, ef_construction, ef: need m >= 2 and both ef >= 1, got {m}, {ef_construction}, {ef}")
        n, dim = x.shape
        cap = max(capacity if capacity is not None else n + math.ceil(n * GROWTH_HEADROOM), n, 1)
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=cap, ef_construction=ef_construction, M=m, random_seed=seed)
        index.set_ef(ef)
        out = cls(index, x, threads=threads)
        if n:
            index.add_items(x, np.arange(n, dtype=np.int64), num_threads=out.threads)
        return out

    def add(self, vectors: npt.ArrayLike, *, threads: int | None = None) -> I64:
        """Append rows (labels continue from len(self)); grows capacity when needed (graph and vectors
        both get GROWTH_HEADROOM spare rows, so growth is amortised). Not safe while anyone searches."""
        x = normalize(vectors, name="vectors", dim=self.dim)
        start = len(self)
        labels = np.arange(start, start + x.shape[0], dtype=np.int64)
        if not x.shape[0]:
            return labels
        needed = start + x.shape[0]
        if needed > self._index.get_max_elements():
            self._index.resize_index(needed + math.ceil(needed * GROWTH_HEADROOM))
        self._index.add_items(x, labels, num_threads=threads or self.threads)
        if needed > self._buf.shape[0]:
            buf = np.empty((needed + math.ceil(needed * GROWTH_HEADROOM), self.dim), np.float32)
            buf[:start] = self._vectors
            self._buf = buf
        self._buf[start:needed] = x
        self._vectors = self._buf[:needed]
        return labels

    def mark_deleted(self, labels: npt.ArrayLike) -> None:
        """Hide rows from every later graph search (hnswlib keeps them as routing nodes). Labels stay
        row numbers; exact search ignores the mark, so callers mask deleted rows there themselves.
        Not safe while anyone searches."""
        for label in np.asarray(labels, dtype=np.int64).tolist():
            self._index.mark_deleted(label)
            self._deleted += 1

    @property
    def deleted(self) -> int:
        """Rows hidden by `mark_deleted`."""
        return self._deleted

    @property
    def capacity(self) -> int:
        """Rows the graph holds before `add` has to grow it."""
        return int(self._index.get_max_elements())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the graph (and the vectors it holds) in hnswlib's format; `load` reads it back."""
        self._index.save_index(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], dim: int, ef: int, *, threads: int = 0,
             vectors: npt.ArrayLike | None = None) -> HnswIndex:
        """Read an index written by `save`. Raises FileNotFoundError, or ValueError if `dim` is wrong.

        `vectors`: the rows the graph was built from (a snapshot's embeddings.npy), normalised here, instead
        of reading them back out of the graph: hnswlib's get_items holds the GIL throughout (about 2.7 s
        at 100k rows), which a server loading a swap candidate while it serves cannot afford."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"HNSW index file {p} does not exist")
        saved_dim = _saved_dim(p)
        if saved_dim != dim:
            # hnswlib itself does not check: it would read every vector at the wrong offsets.
            raise ValueError(f"HNSW index file {p}: holds {saved_dim}-d vectors, cannot load with dim={dim}")
        index = hnswlib.Index(space="ip", dim=dim)
        try:
            index.load_index(os.fspath(p))  # keeps the saved capacity (headroom included)
        except RuntimeError as e:  # truncated or not an hnswlib file
            raise ValueError(f"HNSW index file {p}: cannot be loaded: {e}") from e
        index.set_ef(ef)
        n = index.get_current_count()
        labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
        if not np.array_equal(labels, np.arange(n, dtype=np.int64)):
            raise ValueError(f"HNSW index file {p}: labels are not the row numbers 0..{n - 1}")
        if vectors is not None:
            rows = normalize(vectors, name="vectors", dim=dim)
            if rows.shape[0] != n:
                raise ValueError(f"HNSW index file {p}: holds {n} rows, {rows.shape[0]} vectors were given")
            return cls(index, rows, threads=threads)
        # hnswlib stores the vectors it was given (already normalised), so the exact-search copy
        # comes back from the file itself: one file per index, nothing to keep in sync.
        out = (np.asarray(index.get_items(labels, return_type="numpy"), dtype=np.float32)
               if n else np.empty((0, dim), np.float32))
        return cls(index, np.ascontiguousarray(out), threads=threads)

    # -- properties ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self._index.dim)

    @property
    def ef(self) -> int:
        """Query-time beam width (hnswlib searches with max(ef, k)). Build side only: not thread-safe."""
        return int(self._index.ef)

    @ef.setter
    def ef(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"ef: must be >= 1, got {value}")
        self._index.set_ef(value)

    @property
    def vectors(self) -> F32:
        """The normalised rows, read-only view (row i = label i)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    # -- search -------------------------------------------------------------------------------------

    def search(self, query: npt.ArrayLike, k: int, *, mask: Mask | None = None) -> tuple[I64, F32]:
        """The k rows most similar to `query` (normalised here), best first, as (indices, similarities).

        `mask` (bool per row) is a pre-filter: only True rows can be returned. k is clamped to the
        number of allowed rows, so fewer than k results means the filter allowed fewer than k rows.
        """
        q = self._query(query)
        n = len(self)
        if k < 0:
            raise ValueError(f"k: must be >= 0, got {k}")
        allowed = n - self._deleted  # marked rows never come back from the graph
        if mask is not None:
            mask = _check_mask(mask, n)
            allowed = int(np.count_nonzero(mask))
            if allowed == n:
                mask, allowed = None, n - self._deleted
        k = min(k, allowed)
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if mask is None:
            labels, dist = self._index.knn_query(q, k=k, num_threads=1)
            return _from_hnsw(labels[0], dist[0])
        if allowed <= self.exact_max_rows or allowed < self.exact_max_fraction * n:
            return exact_search(self._vectors, q, k, mask)
        # The bound C method costs no Python frame per visited node, and unlike mask.tolist() (0.7 ms
        # at 100k rows) nothing is converted up front; measured as fast per call as a list or a set.
        try:
            labels, dist = self._index.knn_query(q, k=k, num_threads=1, filter=mask.__getitem__)
        except RuntimeError:
            # hnswlib raises when the filtered walk found fewer than k allowed rows (ef too small for a
            # fragmented allowed set). Exact search always can.
            return exact_search(self._vectors, q, k, mask)
        return _from_hnsw(labels[0], dist[0])

    def search_batch(self, queries: npt.ArrayLike, k: int) -> tuple[I64, F32]:
        """Unfiltered search of many queries on `threads` threads: (n_queries x k') arrays, k' = min(k, n).

        For evaluation and warm-up; serving uses `search`, one query per worker-pool call.
        """
        q = normalize(queries, name="queries", dim=self.dim)
        if k < 0:
            raise ValueError(f"k: must be >= 0, got {k}")
        k = min(k, len(self))
        if k == 0 or q.shape[0] == 0:
            return np.empty((q.shape[0], 0), np.int64), np.empty((q.shape[0], 0), np.float32)
        labels, dist = self._index.knn_query(q, k=k, num_threads=self.threads)
        return labels.astype(np.int64), (1.0 - dist).astype(np.float32)

    def _query(self, query: npt.ArrayLike) -> F32:
        q = np.asarray(query, dtype=np.float32)
        if q.shape != (self.dim,):
            raise ValueError(f"query: expected shape ({self.dim},), got {q.shape}")
        return normalize(q[None, :], name="query")[0]


def normalize(vectors: npt.ArrayLike, *, name: str, dim: int | None = None) -> F32:
    """Rows scaled to unit L2 norm as a new C-contiguous float32 array; zero or non-finite rows raise."""
    x = np.array(vectors, dtype=np.float32, order="C")
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise ValueError(f"{name}: expected shape {want}, got {x.shape}")
    if x.size == 0:
        return x
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        raise ValueError(f"{name}: row {int(bad[0])} is zero or not finite and cannot be normalised")
    x /= norms[:, None]
    return x


def _saved_dim(path: Path) -> int:
    """Vector dimension recorded in an hnswlib index file (format of hnswlib 0.5-0.8 `saveIndex`).

    The header starts with six size_t: offsetLevel0, max_elements, cur_element_count,
    size_data_per_element, label_offset, offsetData; a row's vector spans [offsetData, label_offset).
    """
    with path.open("rb") as f:
        header = f.read(48)
    if len(header) < 48:
        raise ValueError(f"HNSW index file {path}: too short to be an hnswlib index")
    label_offset, offset_data = struct.unpack("<6Q", header)[4:6]
    data_size = label_offset - offset_data
    if data_size <= 0 or data_size % 4:
        raise ValueError(f"HNSW index file {path}: not an hnswlib float32 index")
    return int(data_size // 4)


def _check_mask(mask: npt.ArrayLike, n: int) -> Mask:
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (n,):
        raise ValueError(f"mask: expected a bool array of shape ({n},), got {m.dtype} {m.shape}")
    return m


def _from_hnsw(labels: npt.NDArray[np.uint64], dist: F32) -> tuple[I64, F32]:
    # hnswlib's "ip" distance is 1 - <q, x>.
    return labels.astype(np.int64), (1.0 - dist).astype(np.float32)
