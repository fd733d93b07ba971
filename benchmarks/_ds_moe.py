"""DeepSpeed-MoE beside ours, for benchmarks only (nothing in models/ or parallel/ knows about it).

    ds_layer_like(ours, ...)     a `deepspeed.moe.layer.MoE` holding some of our layer's weights
    swap_in_deepspeed(model, ep) our transformer with every MoE FFN replaced by DeepSpeed's
    python benchmarks/_ds_moe.py --config RUN/config.yaml --run-dir RUN
                                 (under torchrun) our Trainer, unchanged, on that swapped model:
                                 the same data, optimizer, DDP and expert-gradient reduction, so
                                 only the MoE layer differs from `sparseforge run`

DeepSpeed's layer as configured here computes what ours does for top-2 softmax routing with
renormalised gates: `drop_tokens=False` (capacity = the largest expert load, max-reduced over the
ep group, so nothing is dropped), no second-expert sampling, no random token selection. Its
all-to-all moves capacity-padded [E, C, D] buffers and is not overlapped with anything.
A shared expert maps to `use_residual=True` (PR-MoE), whose output is mixed with the routed one
by a learned softmax coefficient instead of added: the same compute, not the same function.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402


def init_deepspeed_comm() -> None:
    """deepspeed.comm on top of the torch process group that is already up (gloo)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def ds_layer_like(ours, expert_ids: list[int], ep_size: int, data_before_expert_parallel: bool = False,
                  gate_rows: list[int] | None = None):
    """A DeepSpeed MoE layer with our layer's weights.

    Args:
        ours: a `models.moe.MoE` with all its experts (top_k 2, softmax, renormalised).
        expert_ids: our experts this rank's DeepSpeed layer holds, in order.
        ep_size: DeepSpeed's expert-parallel size (its layer has len(expert_ids) * ep_size experts).
        data_before_expert_parallel: DeepSpeed's strided ep groups (world 4, ep 2: {0,2}, {1,3})
            instead of consecutive ones ({0,1}, {2,3}).
        gate_rows: router rows to keep (default all): the layer routes over these experts only.
    """
    from deepspeed.moe.layer import MoE as DSMoE

    from models.ffn import FeedForward

    if ours.top_k != 2:
        raise ValueError("DeepSpeed's top-2 gating matches ours for top_k=2 only")
    gate_w = ours.router.gate.weight if gate_rows is None else ours.router.gate.weight[gate_rows]
    num_experts = len(expert_ids) * ep_size
    if gate_w.shape[0] != num_experts:
        raise ValueError(f"{gate_w.shape[0]} router rows for {num_experts} DeepSpeed experts")
    D, F_ = ours.experts.w1_EFD.shape[2], ours.experts.w1_EFD.shape[1]
    shared = ours.shared_experts
    layer = DSMoE(hidden_size=D, expert=FeedForward(D, F_), num_experts=num_experts, ep_size=ep_size, k=2,
                  drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False,
                  use_residual=shared is not None)
    if shared is not None:  # the residual MLP: our shared expert's shape and weights
        layer.mlp = FeedForward(D, shared.w1.weight.shape[0])
        layer.mlp.load_state_dict(shared.state_dict())
    layer.set_deepspeed_parallelism(use_data_before_expert_parallel_=data_before_expert_parallel)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(gate_w)
        for ffn, e in zip(layer.deepspeed_moe.experts.deepspeed_experts, expert_ids, strict=True):
            ffn.w1.weight.copy_(ours.experts.w1_EFD[e])
            ffn.w3.weight.copy_(ours.experts.w3_EFD[e])
            ffn.w2.weight.copy_(ours.experts.w2_EDF[e])
    return layer


class DeepSpeedMoEFFN(nn.Module):
    """The FFN slot of one of our blocks filled by a DeepSpeed MoE layer. Its `l_aux` (Switch
    balance loss) reaches backward with our aux-loss coefficient, attached to the output as our
    layer attaches its own (so the trainer's `loss.backward()` covers it)."""

    def __init__(self, layer, aux_loss_coeff: float):
        super().__init__()
        self.moe = layer
        self.aux_loss_coeff = aux_loss_coeff
        self.rows = [0, 0]  # rows DeepSpeed exchanged and computed (E x capacity), real assignments
        layer.deepspeed_moe.gate.register_forward_hook(self._count_rows)

    def _count_rows(self, gate, inputs, out) -> None:
        # gate -> (l_aux, capacity, num_experts, indices, locations, gates, exp_counts)
        self.rows[0] += int(out[1]) * int(out[2])
        self.rows[1] += int(out[-1].sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from models.moe.layer import AttachAuxLoss

        y, l_aux, _ = self.moe(x)
        if self.training and torch.is_grad_enabled() and self.aux_loss_coeff > 0:
            y = AttachAuxLoss.apply(y, l_aux * self.aux_loss_coeff, 1.0)
        return y


def swap_in_deepspeed(model: nn.Module, ep_size: int) -> nn.Module:
    """Replace every MoE FFN of our transformer by DeepSpeed's, ep_size-way expert parallel with
    DeepSpeed's default (consecutive) groups, which are the ep groups of our mesh. Needs the
    process group up; every rank must have built the same full model (same seed)."""
    import torch.distributed as dist

    from models.moe import MoE

    init_deepspeed_comm()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for block in model.layers.values():
        if isinstance(block.ffn, MoE):
            local = block.ffn.num_experts // ep_size
            ep_rank = rank % ep_size
            ds = ds_layer_like(block.ffn, list(range(ep_rank * local, (ep_rank + 1) * local)), ep_size)
            block.ffn = DeepSpeedMoEFFN(ds, block.ffn.aux_loss_coeff)
    return model


def main(argv: list[str] | None = None) -> int:
    """Our trainer entry, with `models.build_model` returning the DeepSpeed-swapped model."""
    p = argparse.ArgumentParser(description="train with DeepSpeed's MoE layer in our model (benchmark)")
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    import models
    from trainer.recipe import load_config
    from trainer.entry import main as entry_main

    cfg = load_config(args.config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    build, built = models.build_model, []

    def build_with_deepspeed(model_cfg, moe_cfg):
        built.append(swap_in_deepspeed(build(model_cfg, moe_cfg), cfg.parallel.ep))
        return built[-1]

    models.build_model = build_with_deepspeed  # trainer.loop calls models.build_model
    code = entry_main(["--config", args.config, "--run-dir", args.run_dir])
    if built and int(os.environ.get("RANK", "0")) == 0:
        layers = [m for m in built[0].modules() if isinstance(m, DeepSpeedMoEFFN)]
        padded, real = (sum(m.rows[i] for m in layers) for i in (0, 1))
        print(f"deepspeed padding: {padded / max(real, 1):.3f} rows exchanged and computed per routed "
              f"assignment (rank 0, training and eval forwards)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
