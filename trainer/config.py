"""The one typed config tree of a run: dataclasses loaded from YAML, then `--set` overrides.

Merge order (later wins): dataclass defaults < model preset < base recipe(s) < recipe < --set.
Every error is a `ConfigError` whose message is one line naming the offending key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe problem, reported as one line that names the key or file."""


@dataclass
class ModelConfig:
    preset: str = ""  # a name in models.registry; its values sit under the recipe's own
    family: str = "llm"
    vocab_size: int = 260
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // num_heads
    ffn_dim: int = 512  # hidden size of dense (non-MoE) FFN layers
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Attention (models/attention.py): gqa (grouped-query) | mla (DeepSeek multi-head latent).
    attention: str = "gqa"
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2-MoE); mla: on q_a and kv_a
    attn_out_bias: bool = False  # bias on the attention output projection
    qk_norm: bool = False  # gqa: RMSNorm over the whole q and k projections before RoPE (OLMoE)
    clip_qkv: float = 0.0  # gqa: clamp q, k, v to [-c, c] (OLMoE); 0: off
    mla_q_lora_rank: int = 0  # rank of the q bottleneck; 0: a full-rank q projection
    mla_kv_lora_rank: int = 512  # the compressed kv latent per token
    mla_qk_nope_head_dim: int = 128  # q/k channels per head without RoPE
    mla_qk_rope_head_dim: int = 64  # q/k channels per head with RoPE (the key's shared by all heads)
    mla_v_head_dim: int = 128
    # A fresh run starts from these weights: "hf:DIR" (a Hugging Face checkpoint of a supported
    # family) or a checkpoint directory of ours; the architecture keys come from the source
    # (trainer/adapt/hf_bridge.py).
    init_from: str = ""
    # Sparse upcycling: a checkpoint directory (step_XXXXXXXX) of a dense run of ours whose
    # weights initialise this MoE model when the run does not resume (models/moe/upcycle.py).
    upcycle_from: str = ""
    upcycle_granularity: int = 1  # G > 1: experts of dense ffn_dim / G, each a 1/G slice
    # DiT (family dit): images of image_size² pixels and in_channels channels, cut into
    # patch_size² patches (one token each); class-conditional over num_classes (label num_classes
    # is the "no label" of classifier-free guidance, used with class_dropout_prob in training).
    image_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True  # also output the interpolation v of the variance (DDPM objective)


@dataclass
class MoEConfig:
    num_experts: int = 8  # 0: a dense model (every FFN is dense)
    top_k: int = 2
    expert_ffn_dim: int = 256
    moe_every: int = 1  # MoE on every k-th layer (after the dense first-k)
    first_k_dense: int = 0
    num_shared_experts: int = 0
    shared_expert_ffn_dim: int = 0  # 0: expert_ffn_dim
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x·w_gate)
    # Routing. expert_choice (each expert picks its top-C tokens) is not causal: a token's
    # routing depends on later tokens, so it suits DiTs and leaks the future in causal LMs.
    routing: str = "token_choice"  # token_choice | expert_choice
    score_func: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    renormalize: bool = True  # chosen top-k weights rescaled to sum 1 (token choice)
    num_groups: int = 0  # group-limited routing (DeepSeek-V3): expert groups; 0: off
    topk_group: int = 0  # groups kept per token (group score = sum of its top-2 expert scores)
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' gate weights
    router_jitter: float = 0.0  # eps of U[1-eps, 1+eps] noise on the router input (training)
    # Balancing: each loss has its own coefficient (0: off) and its own log key moe/<name>.
    aux_loss_coeff: float = 0.01  # Switch/GShard load-balancing loss
    seq_aux_loss_coeff: float = 0.0  # the same per sequence, averaged (DeepSeek-V2/V3)
    z_loss_coeff: float = 0.001  # router z-loss
    expert_balance_loss_coeff: float = 0.0  # DiT-MoE/DeepSeekMoE expert-level balance loss
    aux_free: bool = False  # auxiliary-loss-free balancing: per-expert selection bias
    aux_free_update_rate: float = 1e-3  # u in b += u·sign(mean load - load), per optimizer step
    # Capacity. Token choice: C = ceil(T·K·capacity_factor/E) per expert, 0: dropless.
    # Expert choice: C = ceil(T·capacity_factor/E), 0: use top_k as the factor.
    capacity_factor: float = 0.0
    drop_policy: str = "probability"  # over capacity keep: probability (highest gate) | position
    pad_to_capacity: bool = False  # pad every expert's rows to C (static shapes, as Megatron)
    backend: str = "auto"  # expert compute backend
    # Pruned models (models/pruning): experts of each MoE layer, in order; empty: every MoE layer
    # has num_experts (then the widest layer's count). A layer routes to min(top_k, its count).
    layer_num_experts: list[int] = field(default_factory=list)
    # Dynamic skipping (NAEE), eval mode only: per MoE layer β; a token drops its 2nd (and later)
    # expert when that expert's gate weight is below β times its 1st's. Empty or 0: off.
    skip_beta: list[float] = field(default_factory=list)


@dataclass
class DiffusionConfig:
    """Objective and sampling of DiT recipes (model.family dit)."""
    # ddpm: ε-prediction (+ the learned-range variance VLB term with model.learn_sigma)
    # v: v-prediction; flow: rectified flow / flow matching (velocity noise - x0)
    objective: str = "ddpm"
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    vlb_weight: float = 1.0  # weight of the VLB term (it is a per-pixel mean, as in DiT)
    flow_logit_mean: float = 0.0  # logit-normal timestep sampling of the flow objective
    flow_logit_std: float = 1.0
    sampler: str = "ddpm"  # ddpm | ddim | dpm_solver_pp (diffusion); euler | heun (flow)
    sample_steps: int = 250  # steps of the sampler (NFE = steps; heun 2 per step but the last)
    cfg_scale: float = 1.5  # classifier-free guidance scale (1: none), over all output channels
    ema_decay: float = 0.999  # EMA of the weights, used for sampling
    num_samples: int = 200  # class-conditional samples drawn at evaluation (over all ranks)


@dataclass
class ParallelConfig:
    dp: int = -1  # -1: world_size // pp
    ep: int = 1  # expert-parallel size, folded into dp
    pp: int = 1
    timeout_s: float = 600.0  # collective timeout
    # How the expert-parallel all-to-alls overlap computation (same numerics for all):
    # none | async | chunked | shared_expert | combinable (async + chunked + shared_expert)
    ep_overlap: str = "none"
    ep_chunks: int = 2  # token chunks pipelined by chunked / combinable
    # Pipeline parallelism (pp > 1), run by torch.distributed.pipelining:
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zbv | dualpipev
    pp_microbatches: int = 0  # pipeline microbatches per micro step (0: the number of stages)
    pp_stages_per_rank: int = 0  # virtual stages per rank (0: 1 for gpipe/1f1b, else 2)
    pp_layers: list[int] = field(default_factory=list)  # layers per stage; empty: balanced by params


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" | local file/dir/glob (text, jsonl, parquet) | hub name
    text_field: str = "text"
    # Images (DiT): source "digits" = scikit-learn's 8x8 digits; a local image folder or a hub
    # dataset name work the same. Fields of the image and its integer label; random h-flips.
    image_field: str = "image"
    label_field: str = "label"
    hflip: bool = False
    split: str = "train"
    max_bytes: int = 8_000_000  # cap on the corpus read (0: all of it)
    tokenizer: str = "byte"  # "byte" | path of a local Hugging Face tokenizer directory
    seq_len: int = 128
    val_fraction: float = 0.05


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant (all after linear warmup)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay
    grad_clip: float = 1.0  # 0: off


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum_steps: int = 1
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    stop_at_step: int = 0  # leave early (after a checkpoint) at this step; 0: off
    run_dir: str = ""  # set by --run-dir; default runs/<recipe name>
    # Reliability (README "Reliability"): torchrun restarts the whole job this many times when a
    # rank fails; every start resumes from the run directory's latest checkpoint.
    max_restarts: int = 0
    # A non-finite loss or gradient norm skips the optimizer step; this many in a row, then stop.
    max_nonfinite_steps: int = 3
    # Warn when one expert takes more than collapse_share of a MoE layer's routed tokens for
    # collapse_steps log intervals in a row (0: off).
    collapse_share: float = 0.9
    collapse_steps: int = 3
    # native: DDP + AdamW. deepspeed: DeepSpeed's ZeRO over the non-expert parameters (routed
    # experts stay sharded by parallel.ep), trainer/adapt/ds_engine.py; needs the `deepspeed` extra.
    engine: str = "native"
    zero_stage: int = 2  # train.engine=deepspeed: 1 (optimizer states) or 2 (+ gradients)


@dataclass
class EvalConfig:
    every: int = 100  # 0: only at the end
    batches: int = 8


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every: int = 100
    keep_last: int = 2  # 0: keep all


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "sparseforge"
    run_name: str = ""
    progress_bar: bool = True
    # Expert-load heatmap (RUN_DIR/plots/expert_load_step_XXXXXXXX.png, and wandb) every N steps
    # of the loads routed since the previous heatmap, summed over dp ranks; 0: off.
    heatmap_every: int = 100
    # Per-expert token counts ([MoE layer][expert], summed over dp ranks since the previous log
    # step) as `moe/tokens_per_expert` in metrics.jsonl; turn off for very many experts x layers.
    expert_loads: bool = True


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning of a base checkpoint of ours (models/peft, trainer/adapt/peft.py).

    The base weights are loaded, frozen, and only what the method adds or selects is trained and
    checkpointed (`full`: every weight, from the base)."""
    method: str = "none"  # none | full | lora | perft | esft
    base: str = ""  # a checkpoint directory step_XXXXXXXX of ours; required when method != none
    train_router: bool = False  # also train the MoE routers (lora, perft, esft)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank
    lora_dropout: float = 0.0  # on the input of the LoRA path of nn.Linear (none on experts)
    # fnmatch patterns on module names (named_modules FQN): a matching nn.Linear gets LoRA, a
    # matching GroupedExperts gets per-expert LoRA ("layers.*.attn.*", "layers.*.ffn.experts",
    # "layers.*.adaLN_modulation.*").
    lora_targets: list[str] = field(default_factory=list)
    perft_variant: str = "R"  # S shared | D dense (N always on) | R routed (own top-k) | E per expert
    perft_num_adapters: int = 4  # D and R (S: 1, E: the number of experts)
    perft_top_k: int = 2  # R
    perft_rank: int = 16  # adapter bottleneck width
    esft_score: str = "gate_mass"  # gate_mass | token_share
    esft_top_p: float = 0.2  # per layer, the smallest expert set with this share of the score
    esft_calib_batches: int = 8  # training micro batches per rank scored before training


@dataclass
class PruneConfig:
    """Compression of a checkpoint of ours (models/pruning, trainer/adapt/prune.py): evaluated before and
    after, written as an ordinary checkpoint (step 0 of the run), then trained for train.steps
    (a recovery fine-tune; 0: compress and evaluate only)."""
    method: str = "none"  # none | experts | merge | dare | darex | ties | magnitude
    checkpoint: str = ""  # the checkpoint directory step_XXXXXXXX to compress; required
    # router_norm: the checkpoint before fine-tuning; dare / darex / ties: the base of the deltas
    reference: str = ""
    criterion: str = "reap"  # experts: frequency | gate_mass | router_norm | reap | naee | random
    sparsity: float = 0.25  # share of experts removed (experts, merge); of expert weights (magnitude)
    budget: str = "per_layer"  # per_layer (each layer the same share) | global (lowest scores overall)
    calib_batches: int = 8  # training micro batches per rank scored (summed over dp)
    seed: int = 0  # the random criterion, DARE masks
    dynamic_skip: bool = False  # also store moe.skip_beta (per-layer β of dynamic skipping, eval only)
    drop_rate: float = 0.9  # dare / darex: p, the share of delta entries dropped
    darex_q: float = 0.0  # darex: rescale by 1/q; 0: q tuned on one calibration batch
    ties_checkpoints: list[str] = field(default_factory=list)  # ties: more fine-tunes of `reference`
    ties_density: float = 0.2  # ties: share of each delta kept (largest magnitudes)
    ties_lambda: float = 1.0  # ties: scale of the merged delta
    nm: str = ""  # magnitude: "2:4" for N:M along the input dim; empty: unstructured `sparsity`


@dataclass
class Config:
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


# ---------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: malformed YAML{line}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _deep_merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_bases(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe with its `base:` chain resolved (paths relative to the recipe file)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: recipe `base:` chain loops back to itself")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: `base` must be a path or a list of paths")
        merged = _deep_merge(merged, _load_with_bases(os.path.join(os.path.dirname(path), b), seen + (path,)))
    return _deep_merge(merged, raw)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def _check_value(path: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` (no dot) as a string; users mean the number
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--set logging.run_name=123` means the string
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{path}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(path + '.' if path else '') + near[0]}?" if near else ""
            raise ConfigError(f"unknown config key {full}{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, full)
        else:
            kwargs[key] = _check_value(full, value, typ)
    return cls(**kwargs)


def load_config(
    recipe: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int | None = None,
) -> Config:
    """Load a recipe (with bases, model preset and --set overrides) and validate it.

    Args:
        recipe: YAML path, or None for the defaults alone.
        overrides: `a.b=value` strings; values are parsed as YAML, then type-checked.
        world_size: when given, the parallel layout is checked against it.
    """
    raw = _load_with_bases(recipe) if recipe else {}
    for item in overrides:
        keys, value = _parse_override(item)
        _set_path(raw, keys, value)
    preset = (raw.get("model") or {}).get("preset") if isinstance(raw.get("model"), dict) else None
    if preset:
        try:
            raw = _deep_merge(_preset_registry().preset_overrides(preset), raw)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
    init_from = (raw.get("model") or {}).get("init_from") if isinstance(raw.get("model"), dict) else None
    if init_from and isinstance(init_from, str):
        from trainer.adapt.hf_bridge import source_architecture  # the source's architecture keys win

        raw = _deep_merge(raw, source_architecture(init_from))
    peft = raw.get("peft") if isinstance(raw.get("peft"), dict) else {}
    base = peft.get("base")
    if isinstance(base, str) and base.startswith("hf:") and peft.get("method", "none") != "none":
        from trainer.adapt.hf_bridge import source_architecture  # a Hugging Face base: its architecture

        raw = _deep_merge(raw, source_architecture(base, "peft.base"))
    cfg = _build(Config, raw, "")
    validate(cfg, world_size)
    return cfg


def _preset_registry():
    """models/registry.py (models owns the preset table), loaded on its own when the `models`
    package is not imported yet: the package imports torch, seconds before a typo in a recipe
    could be reported. The file is plain Python."""
    import importlib.util
    import sys

    if "models.registry" in sys.modules:
        return sys.modules["models.registry"]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "registry.py")
    spec = importlib.util.spec_from_file_location("sparseforge_model_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write atomically through a temporary file of our own, so concurrent writers (every node
    of a multi-node launch on a shared file system) never rename each other's file."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be known before a process starts.


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{path}: {value!r} is not one of {', '.join(allowed)}")


def resolved_dp(par: ParallelConfig, world_size: int) -> int:
    """The data-parallel size: explicit, or what the world leaves after pipeline stages."""
    return par.dp if par.dp > 0 else world_size // par.pp


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
_V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank in a V: rank r holds r and 2·pp-1-r


def pp_stages_per_rank(par: ParallelConfig) -> int:
    """Stages each pipeline rank holds: explicit, or what the schedule needs."""
    if par.pp_stages_per_rank > 0:
        return par.pp_stages_per_rank
    return 1 if par.pp_schedule in ("gpipe", "1f1b") else 2


def pp_microbatches(par: ParallelConfig) -> int:
    """Pipeline microbatches per micro step: explicit, or one per stage."""
    return par.pp_microbatches if par.pp_microbatches > 0 else par.pp * pp_stages_per_rank(par)


def _validate_pipeline(cfg: Config) -> None:
    """The parallel.pp_* fields, checked only when parallel.pp > 1."""
    par, m, tr = cfg.parallel, cfg.model, cfg.train
    v, stages = pp_stages_per_rank(par), par.pp * pp_stages_per_rank(par)
    if par.pp_schedule in ("gpipe", "1f1b"):
        _require(v == 1, f"parallel.pp_stages_per_rank={v}: pp_schedule={par.pp_schedule} runs one stage per rank")
    elif par.pp_schedule in _V_SCHEDULES:
        _require(v == 2, f"parallel.pp_stages_per_rank={v}: pp_schedule={par.pp_schedule} runs exactly 2 stages per rank (a V)")
    else:
        _require(v >= 2, f"parallel.pp_stages_per_rank={v}: pp_schedule=interleaved_1f1b needs >= 2 stages per rank")
    _require(stages <= m.num_layers,
             f"parallel.pp={par.pp} x pp_stages_per_rank={v} = {stages} stages for model.num_layers={m.num_layers}: "
             f"every stage needs a layer")
    if par.pp_layers:
        _require(len(par.pp_layers) == stages,
                 f"parallel.pp_layers has {len(par.pp_layers)} entries for {stages} pipeline stages")
        _require(all(n >= 1 for n in par.pp_layers), f"parallel.pp_layers={par.pp_layers}: every stage needs >= 1 layer")
        _require(sum(par.pp_layers) == m.num_layers,
                 f"parallel.pp_layers={par.pp_layers} sums to {sum(par.pp_layers)}, model.num_layers={m.num_layers}")
    mb = pp_microbatches(par)
    _require(par.pp_microbatches >= 0, f"parallel.pp_microbatches: must be >= 0, got {par.pp_microbatches}")
    _require(tr.micro_batch_size % mb == 0,
             f"parallel.pp_microbatches={mb} does not divide train.micro_batch_size={tr.micro_batch_size}")
    _require(mb >= par.pp, f"parallel.pp_microbatches={mb} must be >= parallel.pp={par.pp} to fill the pipeline")
    if par.pp_schedule == "dualpipev":
        _require(mb >= stages, f"parallel.pp_microbatches={mb}: dualpipev needs >= {stages} (2 x pp)")
    _require(not m.tie_embeddings,
             "model.tie_embeddings: pipeline stages need untied embeddings (the first and last stage would share a weight)")


DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm_solver_pp")
FLOW_SAMPLERS = ("euler", "heun")


def _validate_dit(cfg: Config) -> None:
    """Model, diffusion and data fields of a DiT recipe (model.family dit)."""
    m, d = cfg.model, cfg.diffusion
    for key, value in {"model.image_size": m.image_size, "model.patch_size": m.patch_size,
                       "model.in_channels": m.in_channels, "model.num_classes": m.num_classes,
                       "diffusion.num_timesteps": d.num_timesteps, "diffusion.sample_steps": d.sample_steps,
                       "diffusion.num_samples": d.num_samples}.items():
        _require(value > 0, f"{key}: must be > 0, got {value}")
    _require(m.image_size % m.patch_size == 0,
             f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}")
    _require(0.0 <= m.class_dropout_prob < 1.0,
             f"model.class_dropout_prob: must be in [0, 1), got {m.class_dropout_prob}")
    _choice("diffusion.objective", d.objective, ("ddpm", "v", "flow"))
    _choice("diffusion.beta_schedule", d.beta_schedule, ("linear", "cosine"))
    samplers = FLOW_SAMPLERS if d.objective == "flow" else DIFFUSION_SAMPLERS
    _require(d.sampler in samplers, f"diffusion.sampler: {d.sampler!r} does not sample diffusion.objective="
                                    f"{d.objective}; use one of {', '.join(samplers)}")
    _require(not m.learn_sigma or d.objective == "ddpm",
             f"model.learn_sigma: the learned variance needs diffusion.objective=ddpm, got {d.objective}")
    _require(d.sample_steps <= d.num_timesteps or d.objective == "flow",
             f"diffusion.sample_steps={d.sample_steps} exceeds diffusion.num_timesteps={d.num_timesteps}")
    _require(0.0 <= d.ema_decay < 1.0, f"diffusion.ema_decay: must be in [0, 1), got {d.ema_decay}")
    _require(d.cfg_scale >= 0, f"diffusion.cfg_scale: must be >= 0, got {d.cfg_scale}")
    _require(d.vlb_weight >= 0, f"diffusion.vlb_weight: must be >= 0, got {d.vlb_weight}")
    _require(d.flow_logit_std > 0, f"diffusion.flow_logit_std: must be > 0, got {d.flow_logit_std}")


def num_moe_layers(cfg: Config) -> int:
    """MoE layers of the model (the layers `models.llm.is_moe_layer` makes MoE)."""
    moe = cfg.moe
    return len(range(moe.first_k_dense, cfg.model.num_layers, moe.moe_every)) if moe.num_experts > 0 else 0


def _validate_pruned_layers(cfg: Config) -> None:
    """moe.layer_num_experts and moe.skip_beta: one entry per MoE layer."""
    moe, ep, n = cfg.moe, cfg.parallel.ep, num_moe_layers(cfg)
    counts = moe.layer_num_experts
    if counts:
        _require(len(counts) == n, f"moe.layer_num_experts has {len(counts)} entries for {n} MoE layers")
        _require(all(E >= 1 for E in counts), f"moe.layer_num_experts={counts}: every layer needs >= 1 expert")
        _require(all(E % ep == 0 for E in counts),
                 f"moe.layer_num_experts={counts}: every count must be divisible by parallel.ep={ep}")
        _require(moe.num_experts == max(counts),
                 f"moe.num_experts={moe.num_experts} must equal max(moe.layer_num_experts)={max(counts)}")
        _require(moe.num_groups == 0, "moe.layer_num_experts: per-layer counts do not support group-limited "
                                      "routing (moe.num_groups > 0)")
    if moe.skip_beta:
        _require(len(moe.skip_beta) == n, f"moe.skip_beta has {len(moe.skip_beta)} entries for {n} MoE layers")
        _require(all(0.0 <= b <= 1.0 for b in moe.skip_beta), f"moe.skip_beta={moe.skip_beta}: each must be in [0, 1]")
        _require(moe.routing == "token_choice", "moe.skip_beta: dynamic skipping needs moe.routing=token_choice")
        _require(moe.top_k >= 2, f"moe.skip_beta: skips a token's 2nd expert; needs moe.top_k >= 2, got {moe.top_k}")


def _validate_routing(moe: MoEConfig) -> None:
    """Routing, balancing and capacity fields of an MoE model (num_experts > 0)."""
    E, tc = moe.num_experts, moe.routing == "token_choice"
    _choice("moe.routing", moe.routing, ("token_choice", "expert_choice"))
    _choice("moe.score_func", moe.score_func, ("softmax", "sigmoid"))
    _choice("moe.drop_policy", moe.drop_policy, ("probability", "position"))
    for key, value in {"moe.seq_aux_loss_coeff": moe.seq_aux_loss_coeff, "moe.num_groups": moe.num_groups,
                       "moe.expert_balance_loss_coeff": moe.expert_balance_loss_coeff,
                       "moe.topk_group": moe.topk_group, "moe.aux_free_update_rate": moe.aux_free_update_rate}.items():
        _require(value >= 0, f"{key}: must be >= 0, got {value}")
    _require(moe.routed_scaling_factor > 0, f"moe.routed_scaling_factor: must be > 0, got {moe.routed_scaling_factor}")
    _require(0 <= moe.router_jitter < 1, f"moe.router_jitter: must be in [0, 1), got {moe.router_jitter}")
    if moe.num_groups > 0:
        G = moe.num_groups
        _require(tc, "moe.num_groups: group-limited routing needs moe.routing=token_choice")
        _require(E % G == 0, f"moe.num_groups={G} does not divide moe.num_experts={E}")
        _require(1 <= moe.topk_group <= G, f"moe.topk_group={moe.topk_group} must be between 1 and moe.num_groups={G}")
        _require(moe.top_k <= moe.topk_group * (E // G),
                 f"moe.top_k={moe.top_k} exceeds the {moe.topk_group * (E // G)} experts "
                 f"in moe.topk_group={moe.topk_group} groups")
    _require(moe.topk_group == 0 or moe.num_groups > 0, f"moe.topk_group={moe.topk_group} needs moe.num_groups > 0")
    _require(tc or not moe.aux_free, "moe.aux_free: needs moe.routing=token_choice (expert choice is balanced already)")
    _require(not moe.pad_to_capacity or moe.capacity_factor > 0 or not tc,
             "moe.pad_to_capacity: needs moe.capacity_factor > 0 (dropless chunks have no fixed size)")
    _require(not moe.shared_expert_gate or moe.num_shared_experts > 0,
             "moe.shared_expert_gate: needs moe.num_shared_experts > 0")


PEFT_METHODS = ("none", "full", "lora", "perft", "esft")
PERFT_VARIANTS = ("S", "D", "R", "E")


def _validate_peft(cfg: Config) -> None:
    """The peft section: the base checkpoint (which must exist: a recipe without one fails here,
    before anything starts) and the ranges of the chosen method's fields."""
    p, moe = cfg.peft, cfg.moe
    _choice("peft.method", p.method, PEFT_METHODS)
    if p.method == "none":
        return
    method = f"peft.method {p.method}"
    _require(p.base != "", f"peft.base: required with {method} (the checkpoint directory step_XXXXXXXX "
                           f"of the model to fine-tune)")
    if p.base.startswith("hf:"):  # a Hugging Face directory: its architecture was merged in by load_config
        _require(os.path.isdir(os.path.expanduser(p.base[3:])), f"peft.base: Hugging Face directory not found: {p.base[3:]}")
    else:
        _require(os.path.isdir(p.base), f"peft.base: checkpoint directory not found: {p.base}")
        from trainer.checkpoint import is_complete  # heavy imports only for PEFT recipes

        _require(is_complete(p.base), f"peft.base: {p.base} is not a complete checkpoint (step_XXXXXXXX with .metadata)")
    for key in ("upcycle_from", "init_from"):
        _require(not getattr(cfg.model, key), f"model.{key}: not with {method}: the weights come from peft.base")
    _require(cfg.prune.method == "none", f"prune.method: not with {method}: prune first, then fine-tune the pruned "
                                         f"checkpoint as peft.base")
    _require(not p.train_router or moe.num_experts > 0, "peft.train_router: needs an MoE model (moe.num_experts > 0)")
    if p.method == "lora":
        _require(len(p.lora_targets) > 0, "peft.lora_targets: required with peft.method lora (fnmatch patterns "
                                          "on module names, e.g. layers.*.attn.*)")
        _require(p.lora_rank >= 1, f"peft.lora_rank: must be >= 1, got {p.lora_rank}")
        _require(p.lora_alpha > 0, f"peft.lora_alpha: must be > 0, got {p.lora_alpha}")
        _require(0.0 <= p.lora_dropout < 1.0, f"peft.lora_dropout: must be in [0, 1), got {p.lora_dropout}")
    elif p.method == "perft":
        _choice("peft.perft_variant", p.perft_variant, PERFT_VARIANTS)
        _require(moe.num_experts > 0, f"peft.perft_variant={p.perft_variant}: PERFT adapters sit in the MoE "
                                      f"layers; needs an MoE model (moe.num_experts > 0)")
        _require(p.perft_rank >= 1, f"peft.perft_rank: must be >= 1, got {p.perft_rank}")
        if p.perft_variant in ("D", "R"):
            _require(p.perft_num_adapters >= 1, f"peft.perft_num_adapters: must be >= 1, got {p.perft_num_adapters}")
        if p.perft_variant == "R":
            _require(1 <= p.perft_top_k <= p.perft_num_adapters,
                     f"peft.perft_top_k={p.perft_top_k} must be between 1 and "
                     f"peft.perft_num_adapters={p.perft_num_adapters}")
    elif p.method == "esft":
        _require(moe.num_experts > 0, "peft.method esft: trains selected experts; needs an MoE model "
                                      "(moe.num_experts > 0)")
        _choice("peft.esft_score", p.esft_score, ("gate_mass", "token_share"))
        _require(0.0 < p.esft_top_p <= 1.0, f"peft.esft_top_p: must be in (0, 1], got {p.esft_top_p}")
        _require(p.esft_calib_batches >= 1, f"peft.esft_calib_batches: must be >= 1, got {p.esft_calib_batches}")


PRUNE_METHODS = ("none", "experts", "merge", "dare", "darex", "ties", "magnitude")
PRUNE_CRITERIA = ("frequency", "gate_mass", "router_norm", "reap", "naee", "random")  # models.pruning.CRITERIA


def _require_checkpoint(key: str, path: str, why: str) -> None:
    _require(path != "", f"{key}: required {why} (a checkpoint directory step_XXXXXXXX of ours)")
    _require(os.path.isdir(path), f"{key}: checkpoint directory not found: {path}")
    from trainer.checkpoint import is_complete  # heavy imports only for prune recipes

    _require(is_complete(path), f"{key}: {path} is not a complete checkpoint (step_XXXXXXXX with .metadata)")


def _validate_prune(cfg: Config) -> None:
    """The prune section: the checkpoints it reads (which must exist, so a recipe whose source
    was never trained fails here), the method's ranges, what a method cannot be combined with."""
    p, moe = cfg.prune, cfg.moe
    _choice("prune.method", p.method, PRUNE_METHODS)
    if p.method == "none":
        return
    method = f"prune.method {p.method}"
    _require_checkpoint("prune.checkpoint", p.checkpoint, f"with {method}")
    _require(cfg.peft.method == "none", f"peft.method {cfg.peft.method}: not with {method}; prune first, "
                                        f"then fine-tune the pruned checkpoint")
    for key in ("upcycle_from", "init_from"):
        _require(not getattr(cfg.model, key), f"model.{key}: not with {method}: the weights come from prune.checkpoint")
    _require(p.calib_batches >= 1, f"prune.calib_batches: must be >= 1, got {p.calib_batches}")
    if p.method in ("experts", "merge", "magnitude"):
        _require(moe.num_experts > 0, f"{method}: needs an MoE model (moe.num_experts > 0)")
    if p.method in ("experts", "merge"):
        _require(moe.num_groups == 0, f"{method}: group-limited routing (moe.num_groups > 0) would break "
                                      f"the expert groups")
        _require(0.0 < p.sparsity < 1.0, f"prune.sparsity: share of experts removed, must be in (0, 1), got {p.sparsity}")
        _choice("prune.budget", p.budget, ("per_layer", "global"))
        if p.method == "experts":
            _choice("prune.criterion", p.criterion, PRUNE_CRITERIA)
            _require(p.criterion != "naee" or p.budget == "per_layer",
                     "prune.budget: criterion naee searches each layer's subset; needs budget per_layer")
            if p.criterion == "router_norm":
                _require_checkpoint("prune.reference", p.reference, "with criterion router_norm (the checkpoint "
                                                                    "before fine-tuning)")
        else:
            _require(p.budget == "per_layer", "prune.budget: merge keeps the same share per layer; needs per_layer")
    if p.dynamic_skip:
        _require(p.method in ("experts", "merge"), f"prune.dynamic_skip: for methods experts and merge, not {p.method}")
        _require(moe.routing == "token_choice" and moe.top_k >= 2,
                 f"prune.dynamic_skip: skips a token's 2nd expert; needs token_choice routing with moe.top_k >= 2")
    if p.method in ("dare", "darex", "ties"):
        _require_checkpoint("prune.reference", p.reference, f"with {method} (the base of the fine-tuned deltas)")
    if p.method in ("dare", "darex"):
        _require(0.0 < p.drop_rate < 1.0, f"prune.drop_rate: must be in (0, 1), got {p.drop_rate}")
    if p.method == "darex":
        _require(p.darex_q == 0 or 0.0 < p.darex_q <= 1.0, f"prune.darex_q: 0 (tuned) or in (0, 1], got {p.darex_q}")
    if p.method == "ties":
        _require(0.0 < p.ties_density <= 1.0, f"prune.ties_density: must be in (0, 1], got {p.ties_density}")
        _require(p.ties_lambda > 0, f"prune.ties_lambda: must be > 0, got {p.ties_lambda}")
        for i, path in enumerate(p.ties_checkpoints):
            _require_checkpoint(f"prune.ties_checkpoints[{i}]", path, "")
    if p.method == "magnitude":
        if p.nm:
            parts = p.nm.split(":")
            ok = len(parts) == 2 and all(x.strip().isdigit() for x in parts) and 0 < int(parts[0]) <= int(parts[1])
            _require(ok, f"prune.nm: expected N:M with 0 < N <= M, e.g. \"2:4\", got {p.nm!r}"
                         + (" (YAML reads an unquoted N:M as a base-60 number: quote it)" if p.nm.isdigit() else ""))
            _require(ok and moe.expert_ffn_dim % int(parts[1]) == 0 and cfg.model.d_model % int(parts[1]) == 0,
                     f"prune.nm={p.nm}: M must divide model.d_model={cfg.model.d_model} and "
                     f"moe.expert_ffn_dim={moe.expert_ffn_dim}")
        else:
            _require(0.0 < p.sparsity < 1.0, f"prune.sparsity: share of expert weights zeroed, must be in (0, 1), "
                                             f"got {p.sparsity}")
    # Nothing keeps the dropped entries at zero while training, so a fine-tune would undo them.
    _require(cfg.train.steps == 0 or p.method not in ("dare", "darex", "magnitude"),
             f"train.steps={cfg.train.steps}: {method} makes weights sparse and training would refill "
             f"them; set train.steps=0 (fine-tune before compressing)")


def _validate_engine(cfg: Config) -> None:
    """train.engine and what DeepSpeed combines with (README "DeepSpeed engine")."""
    tr = cfg.train
    _choice("train.engine", tr.engine, ("native", "deepspeed"))
    _require(tr.zero_stage in (1, 2, 3), f"train.zero_stage: must be 1 or 2, got {tr.zero_stage}")
    if tr.engine != "deepspeed":
        return
    _require(tr.zero_stage != 3, "train.zero_stage=3: ZeRO-3 would partition the expert parameters that "
                                 "parallel.ep shards; use 1 or 2")
    _require(cfg.parallel.pp == 1, f"train.engine=deepspeed: not with parallel.pp={cfg.parallel.pp} (pipeline "
                                   f"stages run on torch.distributed.pipelining; use train.engine=native)")
    # ESFT zeroes unselected expert rows before the step, ZeRO-2 reduces gradients inside backward.
    _require(cfg.peft.method != "esft", "train.engine=deepspeed: not with peft.method=esft (use train.engine=native)")
    # A prune run writes its compressed model as a step-0 checkpoint without ZeRO state.
    _require(cfg.prune.method == "none", "train.engine=deepspeed: not with prune.method (prune with "
                                         "train.engine=native, then train from its checkpoint)")
    # DeepSpeed's bf16 keeps the weights in bf16, where the EMA's small steps would round away.
    _require(not (cfg.model.family == "dit" and tr.dtype == "bf16"),
             "train.engine=deepspeed: not with train.dtype=bf16 for model.family=dit (the EMA would average "
             "bf16 weights); use fp32 or train.engine=native")


def _validate_attention(cfg: Config) -> None:
    """model.attention and its options; model.init_from against other weight sources."""
    m = cfg.model
    _choice("model.attention", m.attention, ("gqa", "mla"))
    _require(m.clip_qkv >= 0, f"model.clip_qkv: must be >= 0, got {m.clip_qkv}")
    if m.attention == "mla":
        dims = {"model.mla_kv_lora_rank": m.mla_kv_lora_rank, "model.mla_qk_nope_head_dim": m.mla_qk_nope_head_dim,
                "model.mla_qk_rope_head_dim": m.mla_qk_rope_head_dim, "model.mla_v_head_dim": m.mla_v_head_dim}
        for key, value in dims.items():
            _require(value > 0, f"{key}: must be > 0 with model.attention=mla, got {value}")
        _require(m.mla_q_lora_rank >= 0, f"model.mla_q_lora_rank: must be >= 0, got {m.mla_q_lora_rank}")
        _require(m.mla_qk_rope_head_dim % 2 == 0, f"model.mla_qk_rope_head_dim={m.mla_qk_rope_head_dim} must be even for RoPE")
        _require(not m.qk_norm and m.clip_qkv == 0, "model.qk_norm, model.clip_qkv: gqa options, not for model.attention=mla")
    _require(not (m.init_from and m.upcycle_from), "model.init_from and model.upcycle_from: choose one source of weights")
    _require(not (m.init_from and (cfg.peft.method != "none" or cfg.prune.method != "none")),
             "model.init_from: not with peft.method or prune.method (their weights come from peft.base or "
             "prune.checkpoint; import-hf makes one of ours)")


def validate(cfg: Config, world_size: int | None = None) -> None:
    m, moe, par, data, opt, tr = cfg.model, cfg.moe, cfg.parallel, cfg.data, cfg.optim, cfg.train
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads,
        "model.ffn_dim": m.ffn_dim, "model.max_seq_len": m.max_seq_len,
        "moe.moe_every": moe.moe_every, "moe.expert_ffn_dim": moe.expert_ffn_dim,
        "parallel.ep": par.ep, "parallel.pp": par.pp, "data.seq_len": data.seq_len,
        "train.micro_batch_size": tr.micro_batch_size,
        "train.grad_accum_steps": tr.grad_accum_steps, "train.log_every": tr.log_every,
        "parallel.timeout_s": par.timeout_s,
        "eval.batches": cfg.eval.batches, "checkpoint.every": cfg.checkpoint.every,
    }
    for key, value in positive.items():
        _require(value > 0, f"{key}: must be > 0, got {value}")
    non_negative = {
        "model.head_dim": m.head_dim, "moe.num_experts": moe.num_experts,
        "moe.first_k_dense": moe.first_k_dense, "moe.num_shared_experts": moe.num_shared_experts,
        "moe.shared_expert_ffn_dim": moe.shared_expert_ffn_dim, "moe.aux_loss_coeff": moe.aux_loss_coeff,
        "moe.z_loss_coeff": moe.z_loss_coeff, "moe.capacity_factor": moe.capacity_factor,
        "data.max_bytes": data.max_bytes, "optim.lr": opt.lr, "optim.weight_decay": opt.weight_decay,
        "optim.warmup_steps": opt.warmup_steps, "optim.grad_clip": opt.grad_clip,
        "train.stop_at_step": tr.stop_at_step, "eval.every": cfg.eval.every,
        "train.steps": tr.steps,  # 0: nothing trained (a prune run compresses and evaluates only)
        "checkpoint.keep_last": cfg.checkpoint.keep_last, "train.max_restarts": tr.max_restarts,
        "train.max_nonfinite_steps": tr.max_nonfinite_steps, "train.collapse_steps": tr.collapse_steps,
        "logging.heatmap_every": cfg.logging.heatmap_every,
    }
    for key, value in non_negative.items():
        _require(value >= 0, f"{key}: must be >= 0, got {value}")
    _choice("model.family", m.family, ("llm", "dit"))
    if m.family == "dit":
        _validate_dit(cfg)
    _choice("moe.backend", moe.backend, ("auto", "loop", "grouped_mm", "megablocks"))
    _choice("optim.schedule", opt.schedule, ("cosine", "wsd", "constant"))
    _choice("train.dtype", tr.dtype, ("fp32", "bf16"))
    _choice("train.device", tr.device, ("auto", "cpu", "cuda"))
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    _validate_attention(cfg)
    if m.head_dim == 0 and m.attention == "gqa":
        _require(m.d_model % m.num_heads == 0,
                 f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} (or set model.head_dim)")
    _require(m.attention != "gqa" or (m.head_dim or m.d_model // m.num_heads) % 2 == 0,
             "model head_dim must be even for RoPE")
    _require(m.family != "llm" or data.seq_len <= m.max_seq_len,
             f"data.seq_len={data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _require(0.0 < data.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {data.val_fraction}")
    _require(0.0 <= opt.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {opt.min_lr_ratio}")
    _require(0.0 < opt.decay_fraction <= 1.0, f"optim.decay_fraction: must be in (0, 1], got {opt.decay_fraction}")
    _require(0.0 < tr.collapse_share <= 1.0, f"train.collapse_share: must be in (0, 1], got {tr.collapse_share}")
    if moe.num_experts > 0:
        _require(1 <= moe.top_k <= moe.num_experts,
                 f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
        _require(moe.num_experts % par.ep == 0,
                 f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={par.ep}")
        _require(moe.first_k_dense < m.num_layers,
                 f"moe.first_k_dense={moe.first_k_dense} leaves no MoE layer in model.num_layers={m.num_layers}")
        _validate_routing(moe)
    _require(moe.num_experts > 0 or not (moe.layer_num_experts or moe.skip_beta),
             "moe.layer_num_experts, moe.skip_beta: need an MoE model (moe.num_experts > 0)")
    _validate_pruned_layers(cfg)
    G = m.upcycle_granularity
    _require(G >= 1, f"model.upcycle_granularity: must be >= 1, got {G}")
    if m.upcycle_from:
        _require(moe.num_experts > 0, "model.upcycle_from: needs an MoE model to upcycle into (moe.num_experts > 0)")
        _require(moe.num_experts % G == 0 and moe.top_k % G == 0,
                 f"model.upcycle_granularity={G} must divide moe.num_experts={moe.num_experts} and moe.top_k={moe.top_k}")
    _choice("parallel.ep_overlap", par.ep_overlap, ("none", "async", "chunked", "shared_expert", "combinable"))
    _require(par.ep_chunks >= 1, f"parallel.ep_chunks: must be >= 1, got {par.ep_chunks}")
    _require(par.ep == 1 or moe.num_experts > 0,
             f"parallel.ep={par.ep}: expert parallelism needs an MoE model (moe.num_experts > 0)")
    _choice("parallel.pp_schedule", par.pp_schedule, PP_SCHEDULES)
    _require(par.pp_stages_per_rank >= 0, f"parallel.pp_stages_per_rank: must be >= 0, got {par.pp_stages_per_rank}")
    if par.pp > 1:
        _validate_pipeline(cfg)
    _validate_peft(cfg)
    _validate_prune(cfg)
    _validate_engine(cfg)
    if world_size is not None:
        _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
        _require(world_size % par.pp == 0,
                 f"world size {world_size} is not divisible by parallel.pp={par.pp}")
        dp = resolved_dp(par, world_size)
        _require(dp * par.pp == world_size,
                 f"parallel layout pp={par.pp} x dp={dp} = {dp * par.pp} ranks does not match world size {world_size}")
        _require(dp % par.ep == 0, f"parallel.ep={par.ep} does not divide the data-parallel size {dp}")
