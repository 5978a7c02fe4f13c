"""Loss-curve PNGs for a run and for a grid of variants (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (training and benchmark machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_run(metrics: dict, path: str | Path) -> Path:
    """One run's training-loss curve, its held-out loss points, and the final losses in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _draw(ax, metrics, label_prefix="")
    ax.set_title(_title(metrics), fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_variants(named_metrics: dict[str, dict], path: str | Path) -> Path:
    """Every variant's curves on one chart, so a reader sees at a glance which learned and which diverged."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for index, (name, metrics) in enumerate(named_metrics.items()):
        _draw(ax, metrics, label_prefix=f"{name}: ", color=f"C{index % 10}")
    ax.set_title("variants: training loss (lines), held-out loss (markers)", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _draw(ax, metrics: dict, label_prefix: str, color: str | None = None) -> None:
    curve = [(s, loss) for s, loss in metrics.get("train_loss_curve", []) if loss is not None]
    status = "" if metrics.get("status") == "ok" else " [FAILED]"
    if curve:
        ax.plot([s for s, _ in curve], [loss for _, loss in curve], color=color,
                label=f"{label_prefix}train{status}", linewidth=1.2)
    evals = [(s, loss) for s, loss in metrics.get("eval_loss_curve", []) if loss is not None]
    if evals and metrics.get("eval_loss_start") is not None:  # step 0: the starting weights' held-out loss
        evals.insert(0, (0, metrics["eval_loss_start"]))
    if evals:
        ax.plot([s for s, _ in evals], [loss for _, loss in evals], color=color, marker="o", linestyle="--",
                label=f"{label_prefix}held-out", linewidth=0.8)


def _title(metrics: dict) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    config = metrics.get("config", {})
    parts = [
        f"lr={config.get('learning_rate')} r={config.get('lora_rank')}",
        f"held-out {fmt(metrics.get('eval_loss'))} (start {fmt(metrics.get('eval_loss_start'))})",
        f"regression {fmt(metrics.get('regression_loss'))} (start {fmt(metrics.get('regression_loss_start'))})",
    ]
    if metrics.get("status") != "ok":
        parts.append(f"FAILED: {metrics.get('reason')}")
    return " | ".join(parts)
