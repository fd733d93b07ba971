"""PEFT runs in the trainer: the base checkpoint, ESFT's expert selection, loading and merging
PEFT checkpoints (the methods themselves are models/peft).

    preflight_peft(cfg)                 launcher preflight: the base's config.yaml and DCP
                                        metadata, the adapters on a meta-device model
    prepare_peft(model, cfg, task, mesh, resume_path, adapted)
                                        base weights into this rank's share of the adapted,
                                        split model -> (ESFT) expert selection
    load_peft_model(ckpt_dir)           (cfg, model): base + adapters + trained weights, no
                                        process group
    merge_peft(ckpt_dir, out)           an ordinary full checkpoint of the merged model

A PEFT checkpoint holds only the trainable parameters, their optimizer state (and the DiT's EMA
of them): trainer/checkpoint.py leaves frozen parameters out. Its config.yaml names the base, so
the base is read again on resume and by `load_peft_model`. Every rank reads the base itself (no
collectives) and seeds the adapter init alike, so all ranks start from identical weights.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import models
from models.config import shape_fields
from models.moe import moe_layers
from models.peft import (adapter_parameter_names, apply_peft, count_parameters, expert_scores, merge_adapters,
                         select_experts)
from parallel import all_reduce_sum, unwrap
from trainer.adapt.config import PeftConfig
from trainer.adapt.sources import check_full_model, resolve_checkpoint
from trainer.checkpoint import (check_stored_shapes, load_model_weights, read_model_state, read_run_state,
                                stored_tensor_names, write_weights_checkpoint)
from trainer.checkpoint_files import checkpoint_root, is_complete, is_step_dir
from trainer.config import Config, ConfigError
from trainer.recipe import checkpoint_config

_KEY = "peft.base"


@dataclass
class PeftState:
    """What the trainer keeps of the PEFT setup."""

    summary: str  # models.peft.apply_peft's one-line summary
    trainable: int  # parameters, on the whole (unsharded) model, adapters included
    total: int
    esft_selection: list[list[int]] | None  # saved with every checkpoint, reused on resume

    def metrics(self) -> dict:
        return {"peft/trainable_params": self.trainable, "peft/total_params": self.total,
                "peft/trainable_frac": self.trainable / max(self.total, 1)}


# ---------------------------------------------------------------------------------------------
# The base checkpoint


def _read_base_config(path: str) -> Config:
    path = resolve_checkpoint(path, _KEY)
    check_full_model(path, _KEY)
    # Where its own weights came from does not matter here, only its shapes.
    return checkpoint_config(path, _KEY, ["peft.method=none", "peft.base=", "model.upcycle_from=",
                                          "model.init_from=", "prune.method=none"])


def _compare(base: Config, cfg: Config, path: str) -> None:
    """Raise on the first config key, then the first tensor, the base cannot fill in this model."""
    theirs, ours = shape_fields(base.model, base.moe), shape_fields(cfg.model, cfg.moe)
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise ConfigError(f"{_KEY}: {key} is {theirs.get(key)} in the base checkpoint, {value} in this "
                              f"run; a base must have this model's shapes")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in models.build_model(cfg.model, cfg.moe).state_dict().items()}
    check_stored_shapes(_KEY, path, expected)


def check_peft_base(path: str, cfg: Config) -> Config:
    """Cheap preflight of `peft.base` (config.yaml and the DCP metadata, no tensor is read).

    Returns:
        The base run's config. Raises `ConfigError` (one line naming the key) on any problem.
    """
    if path.startswith("hf:"):  # shapes taken from it by load_config; the conversion checks every tensor
        from trainer.adapt.hf_bridge import check_init_source

        check_init_source(path, _KEY)
        return cfg
    base = _read_base_config(path)
    _compare(base, cfg, path)
    return base


def preflight_peft(cfg: Config) -> None:
    """Launcher preflight of a PEFT run: the base, then the adapters applied to a meta-device
    model: a LoRA target that matches nothing, or a pipeline stage with nothing to train (its
    optimizer would be empty), is refused here rather than on the ranks. Raises `ConfigError`
    (one line)."""
    check_peft_base(cfg.peft.base, cfg)
    check_peft_model(cfg)


def check_peft_model(cfg: Config) -> None:
    """The model half of `check_peft` (no base is read)."""
    with torch.device("meta"):
        model = models.build_model(cfg.model, cfg.moe)
    # ESFT's experts are chosen from data at start; every MoE layer trains at least one.
    selection = [[0] for _ in moe_layers(model)] if cfg.peft.method == "esft" else None
    try:
        apply_peft(model, cfg.peft, selection)
    except ValueError as e:
        raise ConfigError(f"peft.lora_targets: {e}" if cfg.peft.method == "lora" else f"peft.method: {e}") from None
    if cfg.parallel.pp > 1:
        from parallel.pipeline import stage_layer_counts, stage_layer_ids

        stages = stage_layer_ids(stage_layer_counts(cfg.parallel, model, cfg.moe))  # as the trainer splits it
        for s, ids in enumerate(stages):
            stage = model.pipeline_stage(ids, first=s == 0, last=s == len(stages) - 1)
            if not any(p.requires_grad for p in stage.parameters()):
                where = f"layers {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"layer {ids[0]}"
                raise ConfigError(f"parallel.pp_layers: pipeline stage {s} ({where}) has nothing to train under "
                                  f"peft.method {cfg.peft.method}; give every stage adapted layers")


@torch.no_grad()
def load_base(model: nn.Module, path: str, cfg: Config, mesh=None) -> str:
    """Fill this rank's share of `model` (adapted or not, split or not: adapter tensors keep their
    values) with the base weights, reading only that share. Collective (mesh given)."""
    check_peft_base(path, cfg)
    if path.startswith("hf:"):
        from trainer.adapt.hf_bridge import init_model_from

        return f"peft: base {init_model_from(model, path, _KEY, cfg, mesh)}"
    ours = set(unwrap(model).state_dict(keep_vars=True))
    load_model_weights(path, model, mesh, names=sorted(ours & set(stored_tensor_names(path))))
    what = "base weights"
    if cfg.model.family == "dit":
        # A DiT is sampled with its EMA weights, and those are what fine-tuning starts from (as the
        # released DiT checkpoints, which are EMA weights); buffers come from the model section.
        ema = sorted(ours & set(stored_tensor_names(path, "ema")))  # the section also holds its update count
        if ema:
            load_model_weights(path, model, mesh, section="ema", names=ema)
            what = "base EMA weights"
    step = torch.load(os.path.join(path, "extra_rank0.pt"), weights_only=False)["step"]
    return f"peft: {what} from {path} (step {step})"


# ---------------------------------------------------------------------------------------------
# Setting a run up


def calibrate_esft(model: nn.Module, cfg: Config, task, mesh) -> list[list[int]]:
    """ESFT's expert selection from the base model on the run's own training data.

    Each rank scores `peft.esft_calib_batches` of its training micro batches (the first ones of
    the data order; the data position is restored afterwards, so training still starts at batch
    0), the scores are summed over dp and rank 0's sum is broadcast, so every rank selects the
    same experts.
    """
    p, data = cfg.peft, task.data
    saved = data.state_dict()
    batches = data.train_batches()

    def run_forward(i: int) -> None:
        # eval_loss: the DiT noises at fixed evaluation keys (no training RNG is consumed).
        task.eval_loss(model, task.to_device(next(batches)), i)

    scores_LE = expert_scores(model, run_forward, p.esft_calib_batches, p.esft_score)
    data.load_state_dict(saved)
    scores_LE = all_reduce_sum(scores_LE, mesh.dp_group)
    if dist.is_initialized() and mesh.world_size > 1:
        dist.broadcast(scores_LE, src=0)  # bit-identical on every rank, whatever the reduction order
    return select_experts(scores_LE, p.esft_top_p)


def prepare_peft(model: nn.Module, cfg: Config, task, mesh, resume_path: str | None,
                 adapted: PeftState | None) -> tuple[PeftState, str]:
    """Base weights into this rank's share of the (adapted, split, materialised) model, then for
    ESFT the expert selection (the resumed checkpoint's, else calibrated on the base) applied.

    Args:
        adapted: what `apply_peft` reported when it added the adapters (None for ESFT).
    Returns:
        (PeftState, the base's log line).
    """
    base_line = load_base(model, cfg.peft.base, cfg, mesh)
    if cfg.peft.method != "esft":
        return adapted, base_line
    selection = read_run_state(resume_path).get("esft_selection") if resume_path is not None else None
    if selection is None:
        selection = calibrate_esft(unwrap(model), cfg, task, mesh)
    summary = apply_peft(unwrap(model), cfg.peft, selection)
    # Counted on the whole model (this rank holds a share of the experts).
    with torch.device("meta"):
        whole = models.build_model(cfg.model, cfg.moe)
    apply_peft(whole, cfg.peft, selection)
    trainable, total = count_parameters(whole)
    return PeftState(summary, trainable, total, selection), base_line


# ---------------------------------------------------------------------------------------------
# PEFT checkpoints outside training


def load_peft_model(ckpt_dir: str) -> tuple[Config, nn.Module]:
    """A PEFT checkpoint as a model on the CPU, in eval mode: built from its config.yaml, filled
    with its base (peft.base), adapted, then given the checkpoint's trained weights. No process
    group is needed; the checkpoint may come from any ep/pp layout.

    Returns:
        (the run's config, the model). Raises `ConfigError` (one line) on any problem.
    """
    if not is_complete(ckpt_dir):
        raise ConfigError(f"{ckpt_dir}: not a complete checkpoint (step_XXXXXXXX with .metadata)")
    cfg = checkpoint_config(ckpt_dir, ckpt_dir)
    if cfg.peft.method == "none":
        raise ConfigError(f"{ckpt_dir}: not a PEFT checkpoint (peft.method none)")
    with torch.device("cpu"):
        model = models.build_model(cfg.model, cfg.moe)
    load_base(model, cfg.peft.base, cfg)
    selection = read_run_state(ckpt_dir).get("esft_selection") if cfg.peft.method == "esft" else None
    if cfg.peft.method == "esft" and selection is None:
        raise ConfigError(f"{ckpt_dir}: an ESFT checkpoint without its expert selection")
    apply_peft(model, cfg.peft, selection)
    # Trainable parameters, and buffers the run may have changed (aux-free biases).
    trained = read_model_state(ckpt_dir)
    if missing := [n for n in adapter_parameter_names(model) if n not in trained]:
        raise ConfigError(f"{ckpt_dir}: the checkpoint has no {missing[0]} for peft.method {cfg.peft.method}")
    unexpected = model.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(f"{ckpt_dir}: the checkpoint holds {unexpected[0]}, which the adapted model does not have")
    return cfg, model.eval()


def _merged_dir(out: str, step: int) -> str:
    """OUT itself when it is named step_XXXXXXXX, else OUT as a run directory."""
    out = os.path.abspath(out)
    return out if is_step_dir(out) else os.path.join(checkpoint_root(out), f"step_{step:08d}")


def merge_peft(ckpt_dir: str, out: str) -> tuple[str, str]:
    """Fold a PEFT checkpoint's adapters into its base and write the result as an ordinary full
    checkpoint of ours (model weights only, config with peft.method none): a `peft.base` or
    `model.upcycle_from` for another run. Not resumable: it has no optimizer or data state.

    Args:
        ckpt_dir: a checkpoint directory of a PEFT run (lora, esft, full; PERFT adapters are
            modules, not weight deltas, and cannot be merged).
        out: the checkpoint directory to write (named step_XXXXXXXX), or a run directory whose
            checkpoints/step_XXXXXXXX (the PEFT checkpoint's step) it becomes.

    Returns:
        (the written checkpoint directory, a one-line summary).
    """
    cfg, model = load_peft_model(ckpt_dir)
    try:
        num_merged = merge_adapters(model)
    except ValueError as e:
        raise ConfigError(f"{ckpt_dir}: {e}") from None
    step = int(torch.load(os.path.join(ckpt_dir, "extra_rank0.pt"), weights_only=False)["step"])
    merged_cfg = copy.deepcopy(cfg)
    merged_cfg.peft = PeftConfig()
    final = write_weights_checkpoint(_merged_dir(out, step), merged_cfg, model.state_dict(),
                                     {"step": step, "run_state": {"merged_from": os.path.abspath(ckpt_dir)}})
    what = {"lora": f"{num_merged} LoRA modules merged", "esft": "ESFT experts (trained in place)",
            "full": "fully fine-tuned weights"}[cfg.peft.method]
    return final, f"merged {ckpt_dir} ({what}) into {final}"
