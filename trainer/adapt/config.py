"""The peft and prune sections of a recipe and their rules (the files they name are checked by the
launcher's preflight, launch/preflight.py). No torch (see models/config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from models.config import (ESFT_SCORES, PEFT_METHODS, PERFT_VARIANTS, PRUNE_CRITERIA, ConfigSection, bounded,
                           require)

if TYPE_CHECKING:
    from trainer.config import Config

PRUNE_METHODS = ("none", "experts", "merge", "dare", "darex", "ties", "magnitude")


@dataclass
class PeftConfig(ConfigSection):
    """Parameter-efficient fine-tuning of a base checkpoint of ours (models/peft, trainer/adapt/peft.py).

    The base weights are loaded, frozen, and only what the method adds or selects is trained and
    checkpointed (`full`: every weight, from the base)."""
    method: Literal[PEFT_METHODS] = "none"
    base: str = ""  # a checkpoint directory step_XXXXXXXX of ours, or hf:DIR; required when method != none
    train_router: bool = False  # also train the MoE routers (lora, perft, esft)
    lora_rank: int = bounded(8, ge=1)
    lora_alpha: float = bounded(16.0, gt=0)  # the update is scaled by alpha / rank
    lora_dropout: float = bounded(0.0, ge=0, lt=1)  # on the input of the LoRA path of nn.Linear (none on experts)
    # fnmatch patterns on module names (named_modules FQN): a matching nn.Linear gets LoRA, a
    # matching GroupedExperts gets per-expert LoRA ("layers.*.attn.*", "layers.*.ffn.experts",
    # "layers.*.adaLN_modulation.*").
    lora_targets: list[str] = field(default_factory=list)
    # A LoRA adapter of the `peft` library (adapter_config.json + adapter_model.safetensors) to
    # start the LoRA from instead of its init; rank, alpha and targets must be this run's
    # (trainer/adapt/peft_interop.py). Not read on resume.
    init_adapter: str = ""
    perft_variant: Literal[PERFT_VARIANTS] = "R"  # S shared | D dense (N always on) | R routed (own top-k) | E per expert
    perft_num_adapters: int = bounded(4, ge=1)  # D and R (S: 1, E: the number of experts)
    perft_top_k: int = 2  # R
    perft_rank: int = bounded(16, ge=1)  # adapter bottleneck width
    esft_score: Literal[ESFT_SCORES] = "gate_mass"
    esft_top_p: float = bounded(0.2, gt=0, le=1)  # per layer, the smallest expert set with this share of the score
    esft_calib_batches: int = bounded(8, ge=1)  # training micro batches per rank scored before training


@dataclass
class PruneConfig(ConfigSection):
    """Compression of a checkpoint of ours (models/pruning, trainer/adapt/prune.py): evaluated before
    and after, written as an ordinary checkpoint (step 0 of the run), then trained for train.steps
    (a recovery fine-tune; 0: compress and evaluate only)."""
    method: Literal[PRUNE_METHODS] = "none"
    checkpoint: str = ""  # the checkpoint directory step_XXXXXXXX to compress; required
    # router_norm: the checkpoint before fine-tuning; dare / darex / ties: the base of the deltas
    reference: str = ""
    criterion: Literal[PRUNE_CRITERIA] = "reap"  # experts: which experts go
    sparsity: float = bounded(0.25, gt=0, lt=1)  # share of experts removed (experts, merge); of expert weights (magnitude)
    budget: Literal["per_layer", "global"] = "per_layer"  # each layer the same share | lowest scores overall
    calib_batches: int = bounded(8, ge=1)  # training micro batches per rank scored (summed over dp)
    seed: int = 0  # the random criterion, DARE masks
    dynamic_skip: bool = False  # also store moe.skip_beta (per-layer β of dynamic skipping, eval only)
    drop_rate: float = bounded(0.9, gt=0, lt=1)  # dare / darex: p, the share of delta entries dropped
    darex_q: float = bounded(0.0, ge=0, le=1)  # darex: rescale by 1/q; 0: q tuned on one calibration batch
    ties_checkpoints: list[str] = field(default_factory=list)  # ties: more fine-tunes of `reference`
    ties_density: float = bounded(0.2, gt=0, le=1)  # ties: share of each delta kept (largest magnitudes)
    ties_lambda: float = bounded(1.0, gt=0)  # ties: scale of the merged delta
    nm: str = ""  # magnitude: "2:4" for N:M along the input dim; empty: unstructured `sparsity`


def peft_shape_fields(p: PeftConfig) -> dict[str, object]:
    """The peft values that decide which tensors a PEFT run's checkpoints hold."""
    if p.method == "none":
        return {"peft.method": p.method}
    return {f"peft.{k}": getattr(p, k) for k in ("method", "lora_rank", "lora_targets", "perft_variant",
                                                 "perft_num_adapters", "perft_rank")}


def _weights_come_from(cfg: Config, method: str, key: str) -> None:
    """A PEFT or prune run takes its weights from `key`: no other source of weights."""
    for other in ("upcycle_from", "init_from"):
        require(not getattr(cfg.model, other), f"model.{other}: not with {method}: the weights come from {key}")


def check_peft(cfg: Config) -> None:
    """The peft section against the rest: a base is named, what a method needs of the model, what
    it cannot be combined with."""
    p, moe = cfg.peft, cfg.moe
    if p.method == "none":
        return
    method = f"peft.method {p.method}"
    require(p.base != "", f"peft.base: required with {method} (the checkpoint directory step_XXXXXXXX "
                          f"of the model to fine-tune)")
    _weights_come_from(cfg, method, "peft.base")
    require(cfg.prune.method == "none", f"prune.method: not with {method}: prune first, then fine-tune the pruned "
                                        f"checkpoint as peft.base")
    require(not p.train_router or moe.num_experts > 0, "peft.train_router: needs an MoE model (moe.num_experts > 0)")
    require(not p.init_adapter or p.method == "lora", f"peft.init_adapter: a LoRA adapter; not with {method}")
    if p.method == "lora":
        require(len(p.lora_targets) > 0, "peft.lora_targets: required with peft.method lora (fnmatch patterns "
                                         "on module names, e.g. layers.*.attn.*)")
    elif p.method == "perft":
        require(moe.num_experts > 0, f"peft.perft_variant={p.perft_variant}: PERFT adapters sit in the MoE "
                                     f"layers; needs an MoE model (moe.num_experts > 0)")
        if p.perft_variant == "R":
            require(1 <= p.perft_top_k <= p.perft_num_adapters,
                    f"peft.perft_top_k={p.perft_top_k} must be between 1 and "
                    f"peft.perft_num_adapters={p.perft_num_adapters}")
    elif p.method == "esft":
        require(moe.num_experts > 0, "peft.method esft: trains selected experts; needs an MoE model "
                                     "(moe.num_experts > 0)")


def check_prune(cfg: Config) -> None:
    """The prune section: the checkpoints a method needs are named, what a method needs of the
    model and cannot be combined with."""
    p, moe = cfg.prune, cfg.moe
    if p.method == "none":
        return
    method = f"prune.method {p.method}"
    require(p.checkpoint != "", f"prune.checkpoint: required with {method} (a checkpoint directory "
                                f"step_XXXXXXXX of ours)")
    _weights_come_from(cfg, method, "prune.checkpoint")  # (and not peft: check_peft refuses the pair)
    if p.method in ("experts", "merge", "magnitude"):
        require(moe.num_experts > 0, f"{method}: needs an MoE model (moe.num_experts > 0)")
    if p.method in ("experts", "merge"):
        require(moe.num_groups == 0, f"{method}: group-limited routing (moe.num_groups > 0) would break "
                                     f"the expert groups")
    if p.method == "experts":
        require(p.criterion != "naee" or p.budget == "per_layer",
                "prune.budget: criterion naee searches each layer's subset; needs budget per_layer")
        require(p.criterion != "router_norm" or p.reference != "",
                "prune.reference: required with criterion router_norm (the checkpoint before fine-tuning)")
    if p.method == "merge":
        require(p.budget == "per_layer", "prune.budget: merge keeps the same share per layer; needs per_layer")
    if p.method in ("dare", "darex", "ties"):
        require(p.reference != "", f"prune.reference: required with {method} (the base of the fine-tuned deltas)")
    if p.dynamic_skip:
        require(p.method in ("experts", "merge"), f"prune.dynamic_skip: for methods experts and merge, not {p.method}")
        require(moe.routing == "token_choice" and moe.top_k >= 2,
                "prune.dynamic_skip: skips a token's 2nd expert; needs token_choice routing with moe.top_k >= 2")
    if p.method == "magnitude" and p.nm:
        _check_nm(p.nm, cfg.model.d_model, moe.expert_ffn_dim)
    # Nothing keeps the dropped entries at zero while training, so a fine-tune would undo them.
    require(cfg.train.steps == 0 or p.method not in ("dare", "darex", "magnitude"),
            f"train.steps={cfg.train.steps}: {method} makes weights sparse and training would refill "
            f"them; set train.steps=0 (fine-tune before compressing)")


def prune_checkpoints(p: PruneConfig) -> list[tuple[str, str]]:
    """(config key, path) of every checkpoint a prune recipe reads."""
    if p.method == "none":
        return []
    out = [("prune.checkpoint", p.checkpoint)]
    if p.method in ("dare", "darex", "ties") or (p.method == "experts" and p.criterion == "router_norm"):
        out.append(("prune.reference", p.reference))
    if p.method == "ties":
        out += [(f"prune.ties_checkpoints[{i}]", path) for i, path in enumerate(p.ties_checkpoints)]
    return out


def _check_nm(nm: str, d_model: int, expert_ffn_dim: int) -> None:
    parts = nm.split(":")
    ok = len(parts) == 2 and all(x.strip().isdigit() for x in parts) and 0 < int(parts[0]) <= int(parts[1])
    require(ok, f"prune.nm: expected N:M with 0 < N <= M, e.g. \"2:4\", got {nm!r}"
                + (" (YAML reads an unquoted N:M as a base-60 number: quote it)" if nm.isdigit() else ""))
    M = int(parts[1])
    require(expert_ffn_dim % M == 0 and d_model % M == 0,
            f"prune.nm={nm}: M must divide model.d_model={d_model} and moe.expert_ffn_dim={expert_ffn_dim}")
