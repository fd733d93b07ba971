"""Training objectives. The LM objective is next-token cross entropy in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats per token); logits are upcast so bf16 runs agree."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
