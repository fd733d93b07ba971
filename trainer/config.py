"""The run's config tree: the sections each layer owns, composed, and the rules between sections.

    model, moe        models/config.py          parallel   parallel/config.py
    diffusion         trainer/diffusion/config.py
    peft, prune       trainer/adapt/config.py
    data, optim, train, eval, checkpoint, logging: here (the loop's own)

Loading a recipe (bases, presets, --set, types and ranges) is trainer/recipe.py; the files a
recipe names are checked by the launcher (launch/preflight.py). No torch is imported here.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from models.config import ConfigError, ConfigSection, ModelConfig, MoEConfig, bounded, check_model, require
from parallel.config import CPU_OFFLOAD_ON_CPU, ParallelConfig, check_parallel
from trainer.adapt.config import PeftConfig, PruneConfig, check_peft, check_prune
from trainer.diffusion.config import DiffusionConfig, check_diffusion

__all__ = ["Config", "ConfigError", "DataConfig", "OptimConfig", "TrainConfig", "EvalConfig", "CheckpointConfig",
           "LoggingConfig", "validate", "config_to_dict", "config_from_dict"]


@dataclass
class DataConfig(ConfigSection):
    source: str = "stdlib"  # "stdlib" | "pydoc" | local file/dir/glob (text, jsonl, parquet) | hub name
    text_field: str = "text"
    # Images (DiT): source "digits" = scikit-learn's 8x8 digits; a local image folder or a hub
    # dataset name work the same. Fields of the image and its integer label; random h-flips.
    image_field: str = "image"
    label_field: str = "label"
    hflip: bool = False
    split: str = "train"
    max_bytes: int = bounded(8_000_000, ge=0)  # cap on the corpus read (0: all of it)
    tokenizer: str = "byte"  # "byte" | path of a local Hugging Face tokenizer directory
    seq_len: int = bounded(128, gt=0)
    val_fraction: float = bounded(0.05, gt=0, lt=1)
    # Pretraining-scale data (docs/data.md). A directory written by `sparseforge prepare-data` is a
    # data.source like any other (memory-mapped, nothing tokenized at start-up); data.mix samples
    # several of them by weight ({directory: weight}; data.source is then unused).
    mix: dict[str, float] = field(default_factory=dict)
    # Attention stays inside each packed document and positions restart per document (LLM).
    document_mask: bool = False
    # Read a hub dataset (or local json/parquet/text) as an HF iterable dataset, tokenized on the
    # fly: for corpora too big to prepare first; the position is saved in checkpoints per rank.
    streaming: bool = False
    # Prepared directories: check every shard's sha256 before the ranks start (sizes always).
    verify_checksums: bool = True


@dataclass
class OptimConfig(ConfigSection):
    lr: float = bounded(3e-3, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # all after linear warmup
    warmup_steps: int = bounded(20, ge=0)
    decay_fraction: float = bounded(0.2, gt=0, le=1)  # wsd: share of the steps spent in the final decay
    grad_clip: float = bounded(1.0, ge=0)  # 0: off
    # AdamW's kernels: auto = fused (one kernel over all tensors) when every parameter is on CUDA,
    # torch's default elsewhere (foreach on CPU), so CPU runs stay bitwise what they were.
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


@dataclass
class TrainConfig(ConfigSection):
    steps: int = bounded(200, ge=0)  # 0: nothing trained (a prune run compresses and evaluates only)
    micro_batch_size: int = bounded(8, gt=0)  # sequences per rank per micro step
    grad_accum_steps: int = bounded(1, gt=0)
    seed: int = 0
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = bounded(10, gt=0)
    stop_at_step: int = bounded(0, ge=0)  # leave early (after a checkpoint) at this step; 0: off
    run_dir: str = ""  # set by --run-dir; default runs/<recipe name>
    # Reliability (docs/reliability.md): torchrun restarts the whole job this many times when a
    # rank fails; every start resumes from the run directory's latest checkpoint.
    max_restarts: int = bounded(0, ge=0)
    # A non-finite loss or gradient norm skips the optimizer step; this many in a row, then stop.
    max_nonfinite_steps: int = bounded(3, ge=0)
    # Warn when one expert takes more than collapse_share of a MoE layer's routed tokens for
    # collapse_steps log intervals in a row (0: off).
    collapse_share: float = bounded(0.9, gt=0, le=1)
    collapse_steps: int = bounded(3, ge=0)
    # native: DDP + AdamW. deepspeed: DeepSpeed's ZeRO over the non-expert parameters (routed
    # experts stay sharded by parallel.ep), trainer/adapt/ds_engine.py; needs the `deepspeed` extra.
    engine: Literal["native", "deepspeed"] = "native"
    zero_stage: Literal[1, 2, 3] = 2  # train.engine=deepspeed: 1 (optimizer states) or 2 (+ gradients)


@dataclass
class EvalConfig(ConfigSection):
    every: int = bounded(100, ge=0)  # 0: only at the end
    batches: int = bounded(8, gt=0)


@dataclass
class CheckpointConfig(ConfigSection):
    enabled: bool = True
    every: int = bounded(100, gt=0)
    keep_last: int = bounded(2, ge=0)  # 0: keep all
    # Write the shards from a background thread while training goes on (a CPU copy first); the
    # run waits for the last one before it ends (docs/reliability.md).
    async_save: bool = False
    # A save that fails (a full disk, an I/O error): stop the run, or warn and train on.
    on_error: Literal["stop", "skip"] = "stop"


@dataclass
class LoggingConfig(ConfigSection):
    wandb: bool = True
    project: str = "sparseforge"
    run_name: str = ""
    progress_bar: bool = True
    # Expert-load heatmap (RUN_DIR/plots/expert_load_step_XXXXXXXX.png, and wandb) every N steps
    # of the loads routed since the previous heatmap, summed over dp ranks; 0: off.
    heatmap_every: int = bounded(100, ge=0)
    # Per-expert token counts ([MoE layer][expert], summed over dp ranks since the previous log
    # step) as `moe/tokens_per_expert` in metrics.jsonl; turn off for very many experts x layers.
    expert_loads: bool = True


@dataclass
class Config(ConfigSection):
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(raw: dict, cls: type = Config, prefix: str = ""):
    """A `Config` from nested dicts of field values, as `config_to_dict` writes them; missing keys
    keep their defaults, an unknown key is a ConfigError. Values are taken as they are: the types
    and ranges are the recipe loader's checks (trainer/recipe.py, pydantic), so this is for
    configs that programs build or pass on themselves, also where pydantic is not installed."""
    fields = {f.name for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        require(key in fields, f"unknown config key {prefix}{key}")
        section = types[key]
        nested = dataclasses.is_dataclass(section) and isinstance(value, dict)
        kwargs[key] = config_from_dict(value, section, f"{prefix}{key}.") if nested else value
    return cls(**kwargs)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every rule between fields and sections (types and ranges are the loader's, trainer/recipe.py).

    Args:
        world_size: when given, the parallel layout is checked against it.
    """
    m, data = cfg.model, cfg.data
    check_model(m, cfg.moe)
    if m.family == "dit":
        check_diffusion(cfg.diffusion, m.learn_sigma)
    require(m.family != "llm" or data.seq_len <= m.max_seq_len,
            f"data.seq_len={data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    require(not (m.init_from and (cfg.peft.method != "none" or cfg.prune.method != "none")),
            "model.init_from: not with peft.method or prune.method (their weights come from peft.base or "
            "prune.checkpoint; import-hf makes one of ours)")
    require(not data.document_mask or m.family == "llm",
            f"data.document_mask: only for model.family=llm, not {m.family}")
    # The mask and per-document positions are built from token ids in the model's forward; a
    # pipeline stage after the first receives only hidden states.
    require(not data.document_mask or cfg.parallel.pp == 1,
            f"data.document_mask: not with parallel.pp={cfg.parallel.pp} (stages pass only hidden states); use pp=1")
    check_parallel(cfg.parallel, m, cfg.moe, cfg.train.micro_batch_size, world_size)
    check_peft(cfg)
    check_prune(cfg)
    _check_engine(cfg)
    _check_data(cfg)
    _check_streaming(cfg)


def _check_data(cfg: Config) -> None:
    """Mixtures (the directories themselves are the launcher's preflight, trainer/lm/corpus.py)."""
    mix = cfg.data.mix
    for path, weight in mix.items():
        require(weight > 0, f"data.mix.{path}: the weight must be > 0, got {weight}")
    require(not mix or cfg.model.family == "llm", "data.mix: mixtures are of prepared text (model.family=llm)")


def _check_engine(cfg: Config) -> None:
    """train.engine and what DeepSpeed combines with (docs/deepspeed_slurm.md)."""
    tr = cfg.train
    # ESFT zeroes unselected expert rows of whole expert tensors; FSDP holds shards of them.
    require(cfg.parallel.data_parallel != "fsdp" or cfg.peft.method != "esft",
            "peft.method=esft: not with parallel.data_parallel=fsdp (use ddp)")
    require(not (cfg.parallel.fsdp_cpu_offload and tr.device == "cpu"), CPU_OFFLOAD_ON_CPU)
    if tr.engine != "deepspeed":
        return
    require(cfg.parallel.data_parallel == "ddp", "train.engine=deepspeed: not with parallel.data_parallel=fsdp "
                                                 "(ZeRO shards the data-parallel state itself)")
    require(not cfg.checkpoint.async_save, "checkpoint.async_save: not with train.engine=deepspeed (ZeRO writes "
                                           "its partitions itself, synchronously)")
    require(tr.zero_stage != 3, "train.zero_stage=3: ZeRO-3 would partition the expert parameters that "
                                "parallel.ep shards; use 1 or 2")
    require(cfg.parallel.pp == 1, f"train.engine=deepspeed: not with parallel.pp={cfg.parallel.pp} (pipeline "
                                  f"stages run on torch.distributed.pipelining; use train.engine=native)")
    require(not cfg.parallel.compile, "train.engine=deepspeed: not with parallel.compile (applied by "
                                      "parallel.parallelize, which DeepSpeed replaces); use train.engine=native")
    require(cfg.parallel.activation_checkpoint == "none",
            f"train.engine=deepspeed: not with parallel.activation_checkpoint={cfg.parallel.activation_checkpoint} "
            f"(applied by parallel.parallelize, which DeepSpeed replaces); use train.engine=native")
    # ESFT zeroes unselected expert rows before the step, ZeRO-2 reduces gradients inside backward.
    require(cfg.peft.method != "esft", "train.engine=deepspeed: not with peft.method=esft (use train.engine=native)")
    # A prune run writes its compressed model as a step-0 checkpoint without ZeRO state.
    require(cfg.prune.method == "none", "train.engine=deepspeed: not with prune.method (prune with "
                                        "train.engine=native, then train from its checkpoint)")
    # DeepSpeed's bf16 keeps the weights in bf16, where the EMA's small steps would round away.
    require(not (cfg.model.family == "dit" and tr.dtype == "bf16"),
            "train.engine=deepspeed: not with train.dtype=bf16 for model.family=dit (the EMA would average "
            "bf16 weights); use fp32 or train.engine=native")


def _check_streaming(cfg: Config) -> None:
    """data.streaming (trainer/lm/streaming.py): text from one source, read on the fly."""
    data = cfg.data
    if not data.streaming:
        return
    require(cfg.model.family == "llm", f"data.streaming: only for model.family=llm (got {cfg.model.family})")
    require(not data.mix, "data.streaming: not with data.mix (a mixture samples prepared directories); "
                          "stream one data.source")
    require(data.source.strip() != "pydoc", "data.streaming: not with data.source=pydoc (a small corpus held in "
                                            "memory); use data.streaming=false")
    # Every round(1/val_fraction)-th document of a rank's stream is held out for validation.
    require(round(1 / data.val_fraction) >= 2, f"data.val_fraction: {data.val_fraction} under data.streaming "
                                               "would hold out every document; use 0.66 or less")
