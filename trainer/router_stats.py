"""Router statistics of a run: what the MoE layers routed, gathered over the dp group (and the
pp group, each rank holding some stages' layers), for the log, the aux-loss-free bias update and
the expert-load heatmap."""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from models.moe import moe_layer_indices, moe_layers, pop_router_stats, pop_step_loads, update_aux_free_bias
from parallel import ParallelMesh, all_reduce_sum, unwrap
from trainer.plots import overload_factors


class RouterStats:
    """The router statistics of this rank's MoE layers (`model` holds this rank's parameters).

    Args:
        aux_free: the layers have a selection bias and it is trained (not a PEFT run that
            freezes the routers): its update needs the loads summed over dp every step.
        heatmap_every: steps between expert-load heatmaps (0: off).
        expert_loads: log per-expert token counts (`moe/tokens_per_expert`).
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh, aux_free: bool, heatmap_every: int,
                 expert_loads: bool):
        self.model, self.mesh, self.aux_free = model, mesh, aux_free
        self.num_moe_layers = len(moe_layers(unwrap(model)))
        self.heatmap_every, self.expert_loads = heatmap_every, expert_loads
        self.heatmap_loads_LE: torch.Tensor | None = None  # routed since the previous heatmap

    def after_step(self) -> None:
        """After each optimizer step: the aux-loss-free bias update, and the heatmap's loads."""
        if not self.num_moe_layers:
            return
        model = unwrap(self.model)
        loads_LE = pop_step_loads(model)
        if self.aux_free:
            # Every rank applies the update computed from the same global loads, so the bias
            # buffers (which DDP does not re-broadcast) stay identical across the dp group.
            loads_LE = all_reduce_sum(loads_LE, self.mesh.dp_group)
            update_aux_free_bias(model, loads_LE)
        if self.heatmap_every:
            loads_LE = loads_LE.double()
            for row, layer in zip(loads_LE, moe_layers(model)):
                row[layer.router.num_experts:] = float("nan")  # experts a pruned layer does not have
            acc = self.heatmap_loads_LE
            self.heatmap_loads_LE = loads_LE if acc is None else acc + loads_LE

    def skip_step(self) -> None:
        """A skipped (non-finite) step: its routing is not trained on, nor drawn in the heatmap."""
        pop_step_loads(unwrap(self.model))

    def discard(self) -> None:
        """Forget what evaluation forwards routed: it is not training routing."""
        pop_router_stats(unwrap(self.model))

    def heatmap_loads(self) -> torch.Tensor | None:
        """The loads routed since the previous heatmap (or the start of this process), summed over
        dp ranks and gathered over pp: every rank must call it (collective); None without loads."""
        loads_LE, self.heatmap_loads_LE = self.heatmap_loads_LE, None
        if loads_LE is not None and not self.aux_free:  # aux-free: summed at every step already
            loads_LE = all_reduce_sum(loads_LE, self.mesh.dp_group)
        return self._gather_layers_over_pp(loads_LE)

    def _gather_layers_over_pp(self, rows_LE: torch.Tensor | None) -> torch.Tensor | None:
        """Per-MoE-layer rows of this rank's stages -> the whole model's rows (pp > 1), in layer
        order, on every rank; the rows themselves when pp == 1."""
        if self.mesh.pp == 1:
            return rows_LE
        mine = (moe_layer_indices(self.model), None if rows_LE is None else rows_LE.cpu())
        gathered: list = [None] * self.mesh.pp
        dist.all_gather_object(gathered, mine, group=self.mesh.pp_group)
        pairs = sorted((i, row) for ids, rows in gathered if rows is not None for i, row in zip(ids, rows))
        return stack_rows([row for _, row in pairs]) if pairs else None

    def collect(self) -> dict:
        """Router statistics since the previous log step, over the whole dp group.

        Scalars (losses, entropy, dropped fraction, bias sizes) are averaged over the ranks, which
        see equally many tokens. Loads are summed over the ranks and the max/mean ratios recomputed
        from the sums: the balance of the global batch, not a mean of per-rank ratios (that would
        overstate the imbalance, each rank seeing fewer tokens). One collective for both.
        """
        scalars, loads_LE = pop_router_stats(unwrap(self.model), with_loads=True)
        if self.mesh.pp > 1:
            return self._collect_over_stages(scalars, loads_LE)
        if not scalars:
            return {}
        keys = sorted(scalars)
        flat = self._sum_over_dp(scalars, keys, loads_LE)
        stats = dict(zip(keys, (flat[:len(keys)] / self.mesh.dp).tolist()))
        if loads_LE is not None:
            stats.update(load_stats(flat[len(keys):].view(loads_LE.shape), keys, self.expert_loads))
        return stats

    def _sum_over_dp(self, scalars: dict, keys: list[str], loads_LE: torch.Tensor | None) -> torch.Tensor:
        """[scalars in `keys` order, loads flattened], summed over the dp group, on the CPU."""
        flat = torch.tensor([scalars[k] for k in keys], dtype=torch.float64)
        if loads_LE is not None:
            flat = torch.cat([flat, loads_LE.to(torch.float64).cpu().flatten()])
        return all_reduce_sum(flat.to(self.mesh.device), self.mesh.dp_group).cpu()

    def _collect_over_stages(self, scalars: dict, loads_LE: torch.Tensor | None) -> dict:
        """`collect` when each rank holds some stages' MoE layers: per stage the sums over dp, then
        every stage's per-layer values, loads and layer counts gathered over pp; the means over
        layers recomputed from them (weighted by each stage's MoE layers)."""
        keys = sorted(scalars)
        flat = self._sum_over_dp(scalars, keys, loads_LE)  # loads: summed
        mine = (keys, (flat[:len(keys)] / self.mesh.dp).tolist(), self.num_moe_layers,  # scalars: mean
                moe_layer_indices(self.model), None if loads_LE is None else flat[len(keys):].view(loads_LE.shape))
        gathered: list = [None] * self.mesh.pp
        dist.all_gather_object(gathered, mine, group=self.mesh.pp_group)
        stats: dict = {}
        weight: dict = {}
        rows = []
        for stage_keys, values, num_layers, ids, stage_loads in gathered:
            for k, v in zip(stage_keys, values):
                if k.startswith("moe/layer") or k == "moe/aux_free_bias_abs_max":
                    stats[k] = max(v, stats.get(k, v))  # per-layer keys are unique to one stage
                else:  # a mean over this stage's layers
                    stats[k] = stats.get(k, 0.0) + v * num_layers
                    weight[k] = weight.get(k, 0) + num_layers
            if stage_loads is not None:
                rows.extend(zip(ids, stage_loads))
        for k, w in weight.items():
            stats[k] /= w
        if rows:
            rows.sort(key=lambda pair: pair[0])
            stats.update(load_stats(stack_rows([r for _, r in rows]), sorted(stats), self.expert_loads))
        return stats


def load_stats(loads_LE: torch.Tensor, keys: list[str], with_loads: bool) -> dict:
    """The load-balance keys of `pop_router_stats`, recomputed from loads summed over ranks.

    Row r of `loads_LE` is the r-th MoE layer that reported statistics, i.e. the r-th
    `moe/layer{i}/...` index in `keys`.
    """
    matches = (re.fullmatch(r"moe/layer(\d+)/load_max_over_mean", k) for k in keys)
    layer_ids = sorted(int(m.group(1)) for m in matches if m)
    ratios_L = overload_factors(loads_LE)
    out = {"moe/load_max_over_mean": ratios_L.mean().item()}
    out.update({f"moe/layer{i}/load_max_over_mean": r for i, r in zip(layer_ids, ratios_L.tolist())})
    if with_loads:  # exact integers: counts of (token, slot) assignments
        # One list per layer, of its own experts (a pruned model's layers differ: NaN past the count).
        out["moe/tokens_per_expert"] = [row[~row.isnan()].round().long().tolist() for row in loads_LE]
    return out


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer rows of expert values stacked [L, E], NaN-padded to the widest (pruned layers)."""
    width = max(r.numel() for r in rows)
    return torch.stack([torch.nn.functional.pad(r.double(), (0, width - r.numel()), value=float("nan")) for r in rows])
