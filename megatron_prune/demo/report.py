"""The demo's quality table and figure.

``results[criterion][drop_ratio][domain]`` is the mean next-token loss of the pruned model;
``baseline[domain]`` that of the unpruned one; ``scores[criterion][layer]`` the per-expert score
vector and ``kept[criterion][drop_ratio][layer]`` the boolean keep-mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["quality_table", "write_figure"]


def quality_table(results: dict, baseline: dict, domains) -> str:
    head = f"{'criterion':16s} {'drop':>5s} " + " ".join(f"{d:>9s}" for d in domains) + f" {'mean':>9s}"
    lines = [head, "-" * len(head)]
    base = [baseline[d] for d in domains]
    lines.append(f"{'(unpruned)':16s} {'0%':>5s} " + " ".join(f"{v:9.4f}" for v in base)
                 + f" {sum(base) / len(base):9.4f}")
    ratios = sorted({r for per in results.values() for r in per})
    for r in ratios:
        for crit in results:
            if r not in results[crit]:
                continue
            vals = [results[crit][r][d] for d in domains]
            lines.append(f"{crit:16s} {int(round(r * 100)):>4d}% " + " ".join(f"{v:9.4f}" for v in vals)
                         + f" {sum(vals) / len(vals):9.4f}")
    lines.append("(mean next-token loss per domain, lower is better; pruned checkpoints reloaded at TP=1)")
    return "\n".join(lines)


def write_figure(path: Path, results: dict, baseline: dict, domains, scores: dict, kept: dict,
                 show_ratio: float) -> Optional[Path]:
    """A PNG: per-layer expert scores (kept vs dropped at ``show_ratio``) and quality per criterion.

    Returns ``None`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    crits = [c for c in scores]
    layers = sorted({layer for c in crits for layer in scores[c]})
    fig, axes = plt.subplots(len(layers) + 1, 1, figsize=(11, 2.2 * (len(layers) + 1)), squeeze=False)
    for row, layer in enumerate(layers):
        ax = axes[row][0]
        grid = []
        for c in crits:
            v = scores[c][layer].double()
            grid.append(((v - v.min()) / (v.max() - v.min() + 1e-12)).tolist())  # per-criterion scale
        ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for r, c in enumerate(crits):
            keep = kept.get(c, {}).get(show_ratio, {}).get(layer)
            if keep is None:
                continue
            for e in range(len(keep)):
                if not bool(keep[e]):
                    ax.text(e, r, "x", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
        ax.set_yticks(range(len(crits)))
        ax.set_yticklabels(crits, fontsize=7)
        ax.set_xticks(range(len(grid[0])))
        ax.set_xlabel("expert", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{layer}: expert scores (row-normalised; x = dropped at {int(show_ratio * 100)}%)", fontsize=8)
    ax = axes[-1][0]
    names = list(results)
    ratios = sorted({r for per in results.values() for r in per})
    width = 0.8 / max(1, len(ratios))
    for j, r in enumerate(ratios):
        vals = [sum(results[c][r][d] for d in domains) / len(domains) for c in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width=width, label=f"drop {int(r * 100)}%")
    base = sum(baseline[d] for d in domains) / len(domains)
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("mean loss")
    ax.set_title("quality after expert pruning (lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
