"""``seqboat plot RUN_DIR``: loss curves from metrics.jsonl and a per-layer heat map of which
tokens of a validation text each layer activates, as PNG files."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.monitor import METRICS_FILE, read_metrics


def plot_run(run_dir: Path, out_dir: Path | None = None, heatmap_tokens: int = 256) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training nodes
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / METRICS_FILE)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_FILE} has no metrics to plot")
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_losses(plt, records, out_dir / "loss.png")]
    heat = activation_heatmap(run_dir, heatmap_tokens)
    if heat is not None:
        written.append(_plot_heatmap(plt, heat, out_dir / "activation.png"))
    return written


def _plot_losses(plt, records: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(
                *zip(*points, strict=True), label=label, marker="." if key == "val/loss" else None
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def activation_heatmap(run_dir: Path, tokens: int) -> torch.Tensor | None:
    """[layers, tokens] activation decisions on the first validation sample, or None for a
    model without a router."""
    from data.loader import validation_samples
    from pretrain.checkpointer import load_trained

    cfg, tok, model, _ = load_trained(run_dir, torch.device("cpu"))
    if cfg.model.arch != "seqboat":
        return None
    sample = validation_samples(cfg.data, tok, cfg.train.seq_length, 1)[:1, :tokens]
    model.eval()
    with torch.no_grad():
        _, stats = model(sample, collect_stats=True)
    return torch.stack([s.activated[:, 0].float() for s in stats])


def save_heatmap(heat: torch.Tensor, path: Path, what: str = "validation text") -> Path:
    """[layers, tokens] activation decisions as a PNG (used for W&B images during training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    return _plot_heatmap(plt, heat, path, what)


def _plot_heatmap(plt, heat: torch.Tensor, path: Path, what: str = "validation text") -> Path:
    fig, ax = plt.subplots(figsize=(10, 1 + 0.4 * heat.shape[0]))
    ax.imshow(heat.numpy(), aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel(f"token position ({what})")
    ax.set_ylabel("layer")
    ratios = ", ".join(f"{r:.2f}" for r in heat.mean(1).tolist())
    ax.set_title(f"activated tokens (black); ratio per layer: {ratios}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
