"""Offline commands: `snaprag index ...` and `snaprag eval` (no server involved)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from server.config import REPO_ROOT, load_config
from server.evaluation import Collection, load_beir, markdown_table, run_method, score_run
from server.knowledge import load_golden, load_knowledge_base
from server.runtime import build_retriever, make_tokenizer

METHOD_MODES = {"bm25": "sparse", "dense": "dense", "hybrid-rrf": "rrf", "hybrid-convex": "convex",
                "hybrid-rerank": "default"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _encoder(cfg: Any, want_dense: bool) -> Any:
    if not want_dense:
        return None
    from server.retrieval.encoder import OnnxEncoder

    dc = cfg.retrieval.dense
    return OnnxEncoder.load(cfg.resolve_path(dc.model_dir), max_length=dc.max_length,
                            intra_op_threads=dc.intra_op_threads, query_max_length=dc.query_max_length)


def run_index(args: argparse.Namespace) -> int:
    from server.retrieval.snapshot import index_texts, verify_snapshot, write_snapshot

    if args.index_command == "verify":
        manifest = verify_snapshot(args.path)
        print(f"{args.path}: OK, {manifest['counts']['passages']} passages, "
              f"{len(manifest['files'])} files with matching sha256"
              f"{', dense ' + str(manifest['dense']['dim']) + '-d' if manifest.get('dense') else ', BM25 only'}")
        return 0
    cfg = load_config(args.config, overrides=args.set)
    from server.knowledge import knowledge_base_from, load_corpus_records

    _log(f"snaprag index build: reading {args.corpus}")
    kb = knowledge_base_from(load_corpus_records(args.corpus))
    if not len(kb):
        raise ValueError(f"{args.corpus}: no passages")
    tokenizer = make_tokenizer(cfg)
    encoder = _encoder(cfg, not args.no_dense)
    embeddings = None
    if encoder is not None:
        from server.retrieval.embed_cache import cached_embeddings

        _log(f"  dense: encoding {len(kb)} passages with {encoder.model_id} (cached by content)")
        embeddings = cached_embeddings(encoder, index_texts(kb), batch_size=cfg.retrieval.dense.batch_size,
                                       progress=True)
    out, extra, store, version = args.out, None, None, ""
    if args.root is not None:
        from server.index.store import SnapshotStore

        store = SnapshotStore(args.root)
        store.ensure()
        version = store.next_version()
        out = store.path(version)
        # wal_through 0: a swap to it re-applies every write the live index holds beyond its snapshot.
        extra = {"lifecycle": {"version": version, "parent": "", "wal_through": 0, "records": 0,
                               "source": str(args.corpus)}}
    manifest = write_snapshot(out, kb, cfg, tokenizer, encoder=encoder, embeddings=embeddings,
                              force=args.force, log=_log, extra=extra)
    if store is not None:
        from server.index.store import Pointer, utc_now

        if store.read_current() is None:
            store.write_current(Pointer(version, history=[{"version": version, "previous": "", "at": utc_now()}]))
            _log(f"  {version} is the first snapshot in {args.root}: it is served from the next start")
        else:
            _log(f"  built {version}; promote it with `snaprag index swap {version}` (its gates decide)")
    print(json.dumps({"snapshot": str(out), **({"version": version} if version else {}), **manifest["counts"]}))
    return 0


def _collection(args: argparse.Namespace) -> Collection:
    if args.kb:
        names = ("voice", "warehouse") if args.kb == "all" else (args.kb,)
        folders = [REPO_ROOT / "data" / "kb" / n for n in names]
        kb = load_knowledge_base(folders)
        queries: dict[str, str] = {}
        qrels: dict[str, dict[str, int]] = {}
        for folder in folders:
            for g in load_golden(folder, args.split):
                queries[g.id] = g.question
                qrels[g.id] = {pid: 1 for pid in g.relevant}
        return Collection(kb, queries, qrels)
    missing = [n for n in ("corpus", "queries", "qrels") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"give --kb, or all of --corpus --queries --qrels (missing: {', '.join(missing)})")
    for n in ("corpus", "queries", "qrels"):
        if not getattr(args, n).exists():
            raise ValueError(f"--{n} {getattr(args, n)}: no such file")
    return load_beir(args.corpus, args.queries, args.qrels)


def _reranked(query: str, retriever: Any, reranker: Any, cfg: Any) -> list[str]:
    """The serving path without a clock: the configured fusion, then the cross-encoder over the head
    (`rerank.max_candidates`), interpolated with the fused score (`rerank.score_weight`)."""
    from server.rerank.budget import rerank_scores

    hits = retriever.search(query, 100)
    head = hits[: cfg.rerank.max_candidates]
    logits = reranker.score(query, [h.passage.text for h in head], batch_size=cfg.rerank.batch_size)
    order, _ = rerank_scores([h.score for h in hits], logits, cfg.rerank.score_weight)
    return [hits[i].passage.id for i in order.tolist()]


def run_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides=args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_MODES]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(METHOD_MODES)}")
    col = _collection(args)
    queries = dict(list(col.queries.items())[: args.limit] if args.limit else col.queries.items())
    _log(f"snaprag eval: {len(col.kb)} passages, {len(queries)} queries")
    want_dense = any(METHOD_MODES[m] != "sparse" for m in methods)
    encoder = _encoder(cfg, want_dense)
    retriever = build_retriever(col.kb, cfg, make_tokenizer(cfg), encoder=encoder, progress=True)
    reranker = None
    if "hybrid-rerank" in methods:
        from server.runtime import load_reranker

        cfg.rerank.enabled = True  # evaluation asks for it whatever the serving default is
        reranker, _ = load_reranker(cfg)
    results: dict[str, dict[str, float]] = {}
    try:
        for m in methods:
            mode = METHOD_MODES[m]

            def search(q: str, mode: Any = mode) -> list[str]:
                if mode == "default":
                    return _reranked(q, retriever, reranker, cfg)
                return [h.passage.id for h in retriever.search(q, 100, None, mode)]

            run, ms = run_method(search, queries, label=m)
            results[m] = {**score_run(run, {q: col.qrels[q] for q in queries}), "ms_per_query": ms}
    finally:
        retriever.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(markdown_table(results))
    return 0
