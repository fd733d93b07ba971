"""Whether a forward is activation checkpointing's recompute of one that already ran."""
from __future__ import annotations

import torch


def is_recomputing() -> bool:
    """True while autograd runs a backward pass on this thread.

    Non-reentrant activation checkpointing (torch's, applied by parallel/recompute.py) re-runs a
    checkpointed region's forward inside the backward node that first needs one of its saved
    tensors, and nothing else runs a module forward during backward. So a forward that sees this
    is a recompute: it must compute exactly what the original forward computed (the same saved
    tensors) but count nothing a second time (router statistics, expert loads).
    """
    return torch._C._current_graph_task_id() != -1
