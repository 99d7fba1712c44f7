"""`snaprag voice`: a voice front end replaying utterances as ASR partial transcripts over Converse.

    snaprag voice                                  8 KB dev questions, spoken at a natural pace
    snaprag voice --file utterances.txt            one utterance a line (or JSONL, see below)
    snaprag voice --barge-in-ms 300 --limit 3      interrupt each answer 300 ms after its first chunk
    snaprag voice --speed 4 -v                     4x faster speech, show every partial

How the speech is simulated (seeded, so a run is reproducible): words arrive every 120-250 ms as growing
partial transcripts; now and then the newest word is first misheard and corrected by the next partial
(ASR revises partials); stability rises as the utterance goes on and is low on a revised partial. After
the last word an end-of-speech pause (350-700 ms) passes, then the final transcript goes out. All
utterances share one Converse stream (a session), up to the server's per-stream limit.

It prints (speaks) each answer chunk as it arrives, with the time since the final transcript, and
measures the time to the first answer chunk after the final transcript. Barge-in: a cue (--barge-in-ms, or
`barge_in_ms` in a JSONL line) makes the user start the next utterance that long after the first chunk
arrived; the server cancels the answer in flight and says so (`interrupted`). On the last utterance the
barge-in cancels the call instead (a client cancel). With the default extractive generator a whole answer
is out within milliseconds, so there is rarely anything left to cancel; with a model backend there is.

Utterance files: plain text, one per line; or JSONL lines `{"text": "...", "barge_in_ms": 300}`. Defaults
come from the KB dev questions (data/kb/voice/golden_dev*.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clients.assistant import AssistantClient, session_start, transcript
from clients.options import add_connection_args, client_from_args

REPO = Path(__file__).resolve().parents[1]
VOICE_KB = REPO / "data/kb/voice"
# Speech timing (ms): conversational English is ~2.5-4 words/s; ASR endpointing waits a few hundred ms.
WORD_GAP_MS = (120.0, 250.0)
END_OF_SPEECH_MS = (350.0, 700.0)
# Share of partials whose newest word is first misheard, then corrected by the next partial.
REVISION_P = 0.2
# Converse allows 64 utterances per stream (voice.max_utterances); a session stays under it.
SESSION_UTTERANCES = 32
# After the final transcript: how long to wait for the answer to finish before giving up on it.
ANSWER_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Utterance:
    text: str
    barge_in_ms: float | None = None
    """Start the next utterance (barge-in) this long after the first answer chunk; None = let it finish."""


@dataclass(frozen=True)
class Partial:
    delay_s: float
    """Wait before sending it (speech time since the previous partial)."""
    text: str
    stability: float
    is_final: bool = False


def load_utterances(path: Path | None, *, limit: int, barge_in_ms: float | None = None,
                    seed: int = 0) -> list[Utterance]:
    """From a text / JSONL file, or (no path) the voice KB's dev questions, shuffled by `seed`."""
    out: list[Utterance] = []
    if path is None:
        from server.knowledge import load_golden

        questions = [q.question for q in load_golden(VOICE_KB, "dev")]
        random.Random(seed).shuffle(questions)
        out = [Utterance(q) for q in questions]
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"cannot read utterances from {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                    out.append(Utterance(str(obj["text"]), obj.get("barge_in_ms")))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected {{\"text\": ..., \"barge_in_ms\": ...}} ({e})") from None
            else:
                out.append(Utterance(line))
        if not out:
            raise ValueError(f"{path}: no utterances (one per line, or JSONL with a text field)")
    out = out[:limit] if limit > 0 else out
    if barge_in_ms is not None:
        out = [Utterance(u.text, u.barge_in_ms if u.barge_in_ms is not None else barge_in_ms) for u in out]
    return out


def mishear(word: str, rng: random.Random) -> str:
    """A plausible ASR slip on one word (dropped or doubled ending, swapped vowel)."""
    if len(word) <= 2:
        return word + "s"
    choice = rng.randrange(3)
    if choice == 0:
        return word[:-1]
    if choice == 1:
        return word + word[-1]
    vowels = "aeiou"
    idx = [i for i, c in enumerate(word) if c in vowels]
    if not idx:
        return word[:-1]
    i = rng.choice(idx)
    return word[:i] + vowels[(vowels.index(word[i]) + 1) % 5] + word[i + 1:]


def asr_partials(text: str, rng: random.Random, *, speed: float = 1.0) -> list[Partial]:
    """The partial transcripts an ASR would stream for `text`, ending with the final one."""
    words = text.split()
    if not words:
        raise ValueError("an utterance is empty")
    out: list[Partial] = []
    for i in range(1, len(words) + 1):
        gap = rng.uniform(*WORD_GAP_MS) / 1000.0 / speed
        heard = words[:i]
        progress = i / len(words)
        if i < len(words) and rng.random() < REVISION_P:
            # the newest word is misheard now; the next partial (one more word) carries the correction
            out.append(Partial(gap, " ".join([*heard[:-1], mishear(heard[-1], rng)]), round(0.3 + 0.3 * progress, 2)))
        else:
            out.append(Partial(gap, " ".join(heard), round(0.5 + 0.45 * progress, 2)))
    pause = rng.uniform(*END_OF_SPEECH_MS) / 1000.0 / speed
    out.append(Partial(pause, text, 1.0, is_final=True))
    return out


@dataclass
class Turn:
    """What one utterance got back."""

    text: str
    final_sent_at: float = 0.0
    first_chunk_ms: float | None = None
    """Client-side: final transcript sent -> first answer chunk received."""
    server_first_chunk_ms: float | None = None
    chunks: list[str] = field(default_factory=list)
    mode: str = ""
    interrupted: bool = False
    cancelled: bool = False
    early_retrieval: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class VoiceReport:
    turns: list[Turn] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def first_chunk_ms(self) -> list[float]:
        return [t.first_chunk_ms for t in self.turns if t.first_chunk_ms is not None]

    def percentiles(self) -> dict[str, float]:
        xs = self.first_chunk_ms()
        if not xs:
            return {}
        a = np.asarray(xs)
        return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "max": float(a.max())}

    def as_dict(self) -> dict[str, Any]:
        return {"utterances": len(self.turns), "first_chunk_ms": self.percentiles(),
                "answered": sum(1 for t in self.turns if t.mode), "interrupted": sum(t.interrupted for t in self.turns),
                "cancelled": sum(t.cancelled for t in self.turns),
                "early_retrieval": sum(t.early_retrieval for t in self.turns),
                "modes": dict(Counter(t.mode for t in self.turns if t.mode)), "errors": dict(self.errors),
                "turns": [{"text": t.text, "first_chunk_ms": t.first_chunk_ms, "server_first_chunk_ms":
                           t.server_first_chunk_ms, "chunks": t.chunks, "mode": t.mode, "interrupted": t.interrupted,
                           "cancelled": t.cancelled, "early_retrieval": t.early_retrieval} for t in self.turns]}


Printer = Callable[[str], None]


async def run_session(client: AssistantClient, utterances: Sequence[Utterance], *, seed: int = 0, speed: float = 1.0,
                      show: Printer | None = None, show_partials: bool = False) -> VoiceReport:
    """Speak `utterances` over one Converse stream (split into sessions of SESSION_UTTERANCES)."""
    report = VoiceReport()
    rng = random.Random(seed)
    for i in range(0, len(utterances), SESSION_UTTERANCES):
        await _one_stream(client, utterances[i:i + SESSION_UTTERANCES], rng, speed, report, show, show_partials)
    return report


async def _one_stream(client: AssistantClient, utterances: Sequence[Utterance], rng: random.Random, speed: float,
                      report: VoiceReport, show: Printer | None, show_partials: bool) -> None:
    say = show or (lambda _s: None)
    turns = [Turn(u.text) for u in utterances]
    report.turns.extend(turns)
    seq = 0
    call: Any = None

    async def speak() -> AsyncIterator[Any]:
        nonlocal seq
        yield session_start(session_id=f"voice-sim-{rng.randrange(1 << 30):x}")
        for i, (u, turn) in enumerate(zip(utterances, turns, strict=True)):
            for p in asr_partials(u.text, rng, speed=speed):
                await asyncio.sleep(p.delay_s)
                seq += 1
                if p.is_final:
                    turn.final_sent_at = time.perf_counter()
                    say(f'you: "{p.text}"')
                elif show_partials:
                    say(f"     … {p.text}  (stability {p.stability:.2f})")
                yield transcript(p.text, is_final=p.is_final, sequence=seq, stability=p.stability)
            # The user's next turn: after the answer, or on the barge-in cue while it is still speaking.
            if u.barge_in_ms is not None:
                waiters = {asyncio.ensure_future(turn.first_chunk.wait()), asyncio.ensure_future(turn.done.wait())}
                await asyncio.wait(waiters, timeout=ANSWER_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                await asyncio.sleep(u.barge_in_ms / 1000.0)
                if not turn.done.is_set():
                    if i + 1 == len(utterances):  # nothing more to say: the user cancels instead
                        say(f"  (barge-in {u.barge_in_ms:g} ms after the first chunk: cancelling the call)")
                        turn.cancelled = True
                        call.cancel()
                        return
                    say(f"  (barge-in: the user starts talking {u.barge_in_ms:g} ms after the first chunk)")
                    continue
            try:
                await asyncio.wait_for(turn.done.wait(), ANSWER_TIMEOUT_S)
            except TimeoutError:
                say(f"  (no answer within {ANSWER_TIMEOUT_S:g} s)")

    call = client.converse(speak(), timeout_s=len(utterances) * (ANSWER_TIMEOUT_S + 10.0))
    try:
        async for ev in call:
            now = time.perf_counter()
            if ev.utterance >= len(turns):
                continue
            turn = turns[ev.utterance]
            kind = ev.WhichOneof("event")
            if kind == "chunk":
                if turn.first_chunk_ms is None:
                    turn.first_chunk_ms = (now - turn.final_sent_at) * 1000.0
                    turn.first_chunk.set()
                turn.chunks.append(ev.chunk.text)
                say(f"  assistant [{(now - turn.final_sent_at) * 1000:6.1f} ms]: {ev.chunk.text}")
            elif kind == "final":
                f = ev.final
                turn.mode = client_mode_name(f.mode)
                turn.interrupted = f.interrupted
                turn.early_retrieval = f.early_retrieval_used
                turn.server_first_chunk_ms = f.first_chunk_ms or None
                if f.interrupted:
                    say(f"  (answer interrupted after {len(turn.chunks)} chunk(s): {f.reason})")
                else:
                    say(f"  [{turn.mode}, first chunk {turn.first_chunk_ms or 0:.1f} ms client / "
                        f"{f.first_chunk_ms:.1f} ms server{', early retrieval' if f.early_retrieval_used else ''}]")
                turn.done.set()
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            report.errors[e.code().name] += 1
            say(f"  error: {e.code().name}: {e.details()}")
    except asyncio.CancelledError:
        if not any(t.cancelled for t in turns):
            raise
    finally:
        for t in turns:
            t.done.set()


def client_mode_name(mode: int) -> str:
    from server.proto import pb

    return pb.ServingMode.Name(mode)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snaprag voice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, help="utterances: one per line, or JSONL {\"text\", \"barge_in_ms\"} "
                                              "(default: the voice KB's dev questions)")
    ap.add_argument("--limit", type=int, default=8, help="most utterances to speak (default 8; 0 = all)")
    ap.add_argument("--barge-in-ms", type=float, help="barge in this long after each answer's first chunk")
    ap.add_argument("--speed", type=float, default=1.0, help="speech speed factor (default 1 = natural pace)")
    ap.add_argument("--seed", type=int, default=0, help="utterance order and speech timing per seed (default 0)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show every partial transcript")
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON instead")
    add_connection_args(ap)
    return ap


async def _main(args: argparse.Namespace) -> int:
    if args.speed <= 0:
        raise ValueError("--speed must be positive")
    utterances = load_utterances(args.file, limit=args.limit, barge_in_ms=args.barge_in_ms, seed=args.seed)
    show = None if args.json else (lambda s: print(s, flush=True))
    async with client_from_args(args, timeout_s=ANSWER_TIMEOUT_S) as client:
        report = await run_session(client, utterances, seed=args.seed, speed=args.speed, show=show,
                                   show_partials=args.verbose)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        d = report.as_dict()
        pct = "  ".join(f"{k} {v:.1f} ms" for k, v in d["first_chunk_ms"].items())
        print(f"\nvoice front end: {d['utterances']} utterances, first chunk after the final transcript: "
              f"{pct or 'n/a'}")
        print(f"  modes {d['modes']}   early retrieval {d['early_retrieval']}   interrupted {d['interrupted']}   "
              f"cancelled {d['cancelled']}   errors {d['errors'] or 0}")
    if report.errors.get("UNAVAILABLE"):
        print(f"snaprag voice: no server at {args.target} (UNAVAILABLE); start one with `make run`, or pass --target",
              file=sys.stderr)
    return 1 if report.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except ValueError as e:
        print(f"snaprag voice: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
