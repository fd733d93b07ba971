"""PNG plots of a run, written under RUN_DIR/plots/ by rank 0.

Expert-load heatmap: one row per MoE layer, one column per routed expert; the colour is the
expert's share of the (token, slot) assignments its layer routed over the plotted window, so
every row sums to 1 and a balanced layer is a flat row at 1/E. Each row is labelled with its
overload factor max/mean (1.0 = perfectly balanced; MaxVio = factor - 1). Layers of a pruned model
may have fewer experts than the widest: their rows are NaN past their own count (left blank).

matplotlib is imported lazily and drawn through its Agg canvas directly (`Figure`, no pyplot),
so plotting never touches the global backend or needs a display.
"""
from __future__ import annotations

import math
import os

import torch

from trainer.atomic import write_atomic

HEATMAP_PREFIX = "expert_load_step_"


def heatmap_path(run_dir: str, step: int) -> str:
    """RUN_DIR/plots/expert_load_step_XXXXXXXX.png (8-digit step, like checkpoint directories)."""
    return os.path.join(run_dir, "plots", f"{HEATMAP_PREFIX}{step:08d}.png")


def load_shares(loads_LE: torch.Tensor) -> torch.Tensor:
    """Each layer's loads divided by the layer's total (rows sum to 1; an all-zero row stays 0;
    NaN entries, experts a layer does not have, stay NaN)."""
    loads_LE = loads_LE.double()
    return loads_LE / loads_LE.nansum(dim=1, keepdim=True).clamp_min(1e-20)


def overload_factors(loads_LE: torch.Tensor) -> torch.Tensor:
    """max/mean load per layer [L] (1 = balanced), over each layer's own experts (not NaN)."""
    loads_LE = loads_LE.double()
    top_L = loads_LE.nan_to_num(nan=-math.inf).max(dim=1).values
    return top_L / loads_LE.nanmean(dim=1).clamp_min(1e-20)


def expert_load_figure(loads_LE: torch.Tensor, step: int, title: str = ""):
    """A matplotlib `Figure` of the heatmap of `loads_LE` [L, E] (tokens per expert per layer)."""
    import numpy as np
    from matplotlib.figure import Figure

    shares_LE = load_shares(loads_LE.detach().cpu()).numpy()
    factors_L = overload_factors(loads_LE.detach().cpu()).tolist()
    num_layers, num_experts = shares_LE.shape
    fig = Figure(figsize=(min(2.5 + 0.45 * num_experts, 24.0), min(1.5 + 0.45 * num_layers, 24.0)),
                 layout="constrained")
    ax = fig.add_subplot()
    # The colour scale starts at 0 and ends at the largest share (at least 2/E) so that a
    # balanced run looks uniform rather than amplifying noise around 1/E.
    vmax = max(float(np.nanmax(shares_LE, initial=0.0)), 2.0 / max(num_experts, 1))
    image = ax.imshow(shares_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (overload max/mean)")
    ax.set_yticks(range(num_layers), [f"{i} ({f:.2f}x)" for i, f in enumerate(factors_L)])
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    if num_experts <= 16 and num_layers <= 32:  # the numbers stay legible
        for (i, j), share in _cells(shares_LE):
            if math.isnan(share):  # an expert this layer does not have
                continue
            ax.text(j, i, f"{share:.0%}", ha="center", va="center", fontsize=7,
                    color="black" if share > 0.6 * vmax else "white")
    ax.set_title(f"{title + ': ' if title else ''}expert load, step {step} "
                 f"(balanced = {1 / max(num_experts, 1):.1%})", fontsize=10)
    return fig


def _cells(values_LE):
    for i, row in enumerate(values_LE):
        for j, value in enumerate(row):
            yield (i, j), float(value)


def save_expert_load_heatmap(loads_LE: torch.Tensor, step: int, run_dir: str, title: str = "") -> str:
    """Write the heatmap of `loads_LE` to `heatmap_path(run_dir, step)` (atomically); returns the path."""
    figure = expert_load_figure(loads_LE, step, title)
    return write_atomic(heatmap_path(run_dir, step), lambda f: figure.savefig(f, format="png", dpi=100))
