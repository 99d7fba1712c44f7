"""PNG plots of a bench run (matplotlib, Agg backend: no display needed).

    cdf.png      latency CDF per RPC, snaprag / baseline / echo at the same load
    stages.png   where the time goes: mean server stage times stacked, then the rest of the client latency
    sweep.png    offered rate against p99 per SLO metric, with the SLO limits as lines
"""

from __future__ import annotations

from pathlib import Path

from bench.report import BenchRun, PhaseRun

COLORS = {"snaprag": "tab:blue", "baseline": "tab:orange", "echo": "tab:gray"}


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(axis) -> None:  # type: ignore[no-untyped-def]
    """Log axes labelled 1, 2, 5, 10, 20 ... instead of 2x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _reference_phases(run: BenchRun) -> dict[str, tuple[str, str]]:
    """Per panel (RPC figure): the phase label and metric to draw, the first phase that has them."""
    panels: dict[str, tuple[str, str]] = {}
    for metric, title in (("plan", "Plan"), ("retrieve", "Retrieve"), ("first_chunk", "voice first chunk"),
                          ("fallback_after_miss", "Plan: fallback after a miss")):
        for prefix in {"plan": ("plan@", "mix@"), "retrieve": ("retrieve@", "mix@"), "first_chunk": ("mix@", "ask@"),
                       "fallback_after_miss": ("miss@",)}[metric]:
            labels = [p.spec.label for p in run.phases if p.target == "snaprag" and p.spec.label.startswith(prefix)
                      and metric in p.stats.latency]
            if labels:
                # the highest-rate phase of that kind: the most telling one
                panels[title] = (max(labels, key=lambda s: float(s.split("@")[1].lstrip("c"))), metric)
                break
    return panels


def plot_cdf(run: BenchRun, path: Path) -> Path | None:
    panels = _reference_phases(run)
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, (label, metric)) in zip(axes[0], panels.items(), strict=True):
        for target in ("snaprag", "baseline", "echo"):
            ph = run.phase(target, label)
            h = ph.stats.latency.get(metric) if ph else None
            if h is None or not h.count:
                continue
            xs, ys = h.cdf()
            ax.step(xs, ys, where="post", color=COLORS[target], label=f"{target} (n={h.count})")
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} @ {label.split('@')[1]}/s", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stage_bar(ph: PhaseRun, rpc: str) -> tuple[list[tuple[str, float]], float] | None:
    s = ph.stats
    e2e = s.latency.get({"Plan": "plan", "Retrieve": "retrieve", "Ask": "ask"}[rpc])
    total = s.server_total.get(rpc)
    if e2e is None or not e2e.count:
        return None
    parts = [(k.split("/", 1)[1], h.mean_ms) for k, h in sorted(s.stages.items()) if k.startswith(f"{rpc}/")
             and h.count and h.mean_ms > 0]
    staged = sum(v for _, v in parts)
    server = total.mean_ms if total is not None and total.count else staged
    if server > staged:
        parts.append(("server, between stages", server - staged))
    parts.append(("client, transport, queueing", max(0.0, e2e.mean_ms - server)))
    return parts, e2e.mean_ms


def plot_stages(run: BenchRun, path: Path) -> Path | None:
    bars: list[tuple[str, list[tuple[str, float]]]] = []
    panels = _reference_phases(run)
    for panel, rpc in (("Plan", "Plan"), ("Retrieve", "Retrieve"), ("voice first chunk", "Ask")):
        if panel not in panels:
            continue
        label = panels[panel][0]
        for target in ("snaprag", "baseline", "echo"):
            ph = run.phase(target, label)
            got = _stage_bar(ph, rpc) if ph else None
            if got:
                bars.append((f"{rpc} @{label.split('@')[1]}/s\n{target}", got[0]))
    if not bars:
        return None
    plt = _plt()
    names = sorted({n for _, parts in bars for n, _ in parts},
                   key=lambda n: (n.startswith("client"), n.startswith("server, between"), n))
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 3), 4.2))
    bottoms = [0.0] * len(bars)
    for j, name in enumerate(names):
        vals = [dict(parts).get(name, 0.0) for _, parts in bars]
        ax.bar(range(len(bars)), vals, bottom=bottoms, label=name, color=cmap(j % 20))
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("mean ms per request")
    ax.set_title("where the time goes (server stage means, then the rest of the client latency)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(run: BenchRun, path: Path) -> Path | None:
    if not run.sweep:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    rates = [s.rate for s in run.sweep]
    limits = {"plan": run.slo.plan_p99_ms, "first_chunk": run.slo.first_chunk_p99_ms,
              "retrieve": run.slo.retrieve_p99_ms}
    for (metric, name), color in zip((("plan", "Plan"), ("first_chunk", "voice first chunk"),
                                      ("retrieve", "Retrieve")), ("tab:blue", "tab:green", "tab:purple"), strict=True):
        ys = []
        for s in run.sweep:
            h = s.stats.latency.get(metric)
            ys.append(h.percentile_ms(99) if h is not None and h.count else float("nan"))
        ax.plot(rates, ys, marker="o", color=color, label=f"{name} p99")
        ax.axhline(limits[metric], color=color, linestyle="--", linewidth=1, label=f"{name} SLO {limits[metric]:g} ms")
    best = run.max_rate_at_slo()
    if best is not None:
        ax.axvline(best, color="black", linestyle=":", linewidth=1, label=f"max rate at SLO: {best:g}/s")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("offered load, requests/s (mix)")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_title("capacity sweep", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(run: BenchRun, out_dir: Path) -> list[Path]:
    out = [plot_cdf(run, out_dir / "cdf.png"), plot_stages(run, out_dir / "stages.png"),
           plot_sweep(run, out_dir / "sweep.png")]
    return [p for p in out if p is not None]
