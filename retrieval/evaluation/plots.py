"""Plots of a factor study (`classify factors --plot`, `retrieval_map.py --sweep --plot`).

Two panels: the score against layer depth, one line per pooling, and the score against
the PCA dimension, one line per layer. Each point is the best score over the factors not
on the axes (jitter, power normalisation, method, ...), so a line shows what the factor
on its x axis can reach. Needs matplotlib (`pip install 'retrieval[bench]'`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["check_plotting", "plot_factors"]


def check_plotting(out: str | Path) -> None:
    """Raise ValueError when a plot could not be written to `out` (no matplotlib, no such
    folder), so that a command can refuse before it starts the work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'retrieval[bench]'") from None
    parent = Path(out).expanduser().resolve().parent
    if not parent.is_dir():
        raise ValueError(f"--plot {out}: folder {parent} does not exist")
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"--plot {out}: write a .png file")


def _best(rows: Sequence[dict], key, score: str) -> dict:
    best: dict = {}
    for r in rows:
        k = key(r)
        if r.get(score) is not None and (k not in best or r[score] > best[k]):
            best[k] = r[score]
    return best


def plot_factors(rows: Sequence[dict], out: str | Path, *, score: str, score_label: str, title: str = "") -> None:
    """Write the two-panel PNG of `rows` (dicts with layer, depth, pool, pca_dim and
    `score`; rows whose depth is None, such as fused layers, are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("depth") is not None]
    fig, (by_layer, by_pca) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
    layers = sorted({(r["depth"], r["layer"]) for r in rows})
    for pool in sorted({r["pool"] for r in rows}):
        best = _best([r for r in rows if r["pool"] == pool], lambda r: (r["depth"], r["layer"]), score)
        xs = [d for d, name in layers if (d, name) in best]
        by_layer.plot(xs, [best[(d, n)] for d, n in layers if (d, n) in best], marker="o", label=pool)
    by_layer.set_xticks([d for d, _ in layers])
    by_layer.set_xticklabels([f"{name}\n{d:.2f}" for d, name in layers], fontsize=7, rotation=30)
    by_layer.set_xlabel("layer (depth in the network)")
    by_layer.set_ylabel(score_label)
    by_layer.set_title("by layer, per pooling")
    by_layer.legend(title="pool", fontsize=8)
    by_layer.grid(alpha=0.3)

    dims = sorted({r["pca_dim"] for r in rows}, key=lambda d: (d == 0, d))
    pos = {d: i for i, d in enumerate(dims)}
    for depth, name in layers:
        best = _best([r for r in rows if r["layer"] == name], lambda r: r["pca_dim"], score)
        ds = [d for d in dims if d in best]
        by_pca.plot([pos[d] for d in ds], [best[d] for d in ds], marker="o", label=name)
    by_pca.set_xticks(range(len(dims)))
    by_pca.set_xticklabels(["none" if d == 0 else str(d) for d in dims])
    by_pca.set_xlabel("PCA dimension (fitted on the training part)")
    by_pca.set_title("by PCA dimension, per layer")
    by_pca.legend(title="layer", fontsize=7)
    by_pca.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(Path(out).expanduser()))
    plt.close(fig)
