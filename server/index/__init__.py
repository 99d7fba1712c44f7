"""The live index: writes while serving, snapshots, and gated blue/green swaps (IndexAdmin).

    build/index/live/                      [index] root
      CURRENT                              which snapshot is served + the write-ahead-log position,
                                           replaced atomically (temp file, fsync, rename)
      snapshots/v000007/                   checksummed snapshot dirs (server/retrieval/snapshot.py)
      wal/00000012.log                     writes not yet in a snapshot, one fsynced record per batch

Read path: every query reads `LiveIndex.view` once, an immutable `IndexView` (view.py): the snapshot's
BM25 segment, the delta segments of rows written since (delta.py), the tombstone mask, and how many
rows of the shared HNSW graph it may see (live_dense.py). A write batch builds the next view and
publishes it with one reference assignment, so a query sees all of a batch or none of it.

Write path (live.py): validate the whole batch (batch.py), encode it on a low-priority thread, append
it to the write-ahead log (wal.py) and fsync, apply it, publish. Acknowledged means durable: a restart
replays the log over the served snapshot.

Snapshot (builder.py): the log is sealed and a separate, niced process rebuilds a compacted snapshot
from the served one plus the sealed log: temp dir, fsync, rename. Killing it at any point leaves the
served snapshot and the log untouched.

Swap (live.py, gates.py, gate_process.py): a separate niced process rebuilds the candidate plus the
writes it lacks, and the live state, from disk and runs every gate (integrity, document count,
golden-set recall). Only then does the server load the candidate, re-apply the writes it lacks, and
promote it with one pointer write (CURRENT) and one reference assignment. In-flight queries finish on
the view they hold. store.py keeps the last N snapshots for rollback.

admin.py serves IndexAdmin (auth.py: bearer tokens or mTLS, checked before a request is read);
serving.py adapts the live index to the `Runtime.retriever` / `Runtime.kb` the pipelines use; cli.py is
`snaprag index upsert|delete|snapshot|swap|rollback|stats`.
"""
