"""LoRA adapters in the format of the `peft` library, out (`export-hf --adapter-only`) and in
(`peft.init_adapter`).

    export_peft_adapter(ckpt, out, ...)   a LoRA checkpoint of ours -> adapter_config.json +
                                          adapter_model.safetensors, for
                                          peft.PeftModel.from_pretrained(<export-hf of the base>, out)
    adapter_state(adapter_dir, cfg)       a peft adapter -> our LoRA tensors (whole model), or a
                                          one-line ConfigError when it does not fit the run
    load_init_adapter(model, cfg)         those tensors into this rank's share of a live model

Mapping (HF module names as transformers 5 holds the model in memory, prefixed by peft with
`base_model.model.`; our names from models/hf/convert.py):

    LoRALinear `layers.{i}.attn.wq` (A [r, in], B [out, r])
        -> target_modules `self_attn.q_proj`: `model.layers.{i}.self_attn.q_proj.lora_A.weight` = A,
           `...lora_B.weight` = B (MLA: B's rows in DeepSeek's interleaved RoPE order, as the weight)
    ExpertLoRA of `layers.{i}.ffn.experts` (A_w1/A_w3 [E, r, D], B_w1/B_w3 [E, F, r], A_w2 [E, r, F],
        B_w2 [E, D, r]) -> target_parameters on `mlp.experts` (peft's ParamWrapper)

peft's ParamWrapper on a 3-D parameter [E, out, in] (transformers' experts are not `is_transposed`)
holds lora_A.weight [E·R, in] and lora_B.weight [out, R·E] and adds, per expert e,
    ΔW_e = (α/R) · B_e A_e,   A_e = lora_A.weight.view(E, R, in)[e],   B_e = lora_B.weight.view(out, R, E)[:, :, e]
(A expert-major, B rank-major: peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight).
- down_proj [E, D, F] = our w2: R = r, directly.
- gate_up_proj [E, 2F, D] = [w1; w3] gets ONE low-rank update per expert, ours has two (w1 and w3,
  each rank r with its own A). [B1 A1; B3 A3] = blockdiag(B1, B3) · [A1; A3], so it is exact at
  rank 2r: A_e = [A1_e; A3_e], B_e = [[B1_e, 0], [0, B3_e]], written with
  rank_pattern {"gate_up_proj": 2r} and alpha_pattern {"gate_up_proj": 2α} (same α/r).
  Coming back, a rank-2r block-diagonal B splits into ours; a rank-r gate_up LoRA (what peft
  trains) is ours with A1 = A3 = A, B1, B3 = B's gate and up rows, also exact.
Two parameters of one module are nested ParamWrappers, the first registered (gate_up_proj)
innermost: its keys are `mlp.experts.base_layer.lora_A.weight`, down_proj's `mlp.experts.lora_A.weight`.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from models.hf.convert import Spec, _rope_rows, _simple_name
from models.hf.families import FAMILIES, HFFormatError, infer_family
from models.moe import GroupedExperts
from models.peft.lora import ExpertLoRA, LoRALinear, apply_lora
from trainer.config import Config, ConfigError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # registration order in transformers' *Experts modules
_KEY = "peft.init_adapter"


# -- names ----------------------------------------------------------------------------------------


def _family(cfg: Config, model_type: str | None, where: str):
    try:
        if model_type is None:
            return infer_family(cfg.model, cfg.moe)
        if model_type not in FAMILIES:
            raise HFFormatError(f"model type {model_type!r} is not one of {', '.join(FAMILIES)}")
        FAMILIES[model_type].check(cfg.model, cfg.moe)
        return FAMILIES[model_type]
    except HFFormatError as e:
        raise ConfigError(f"{where}: {e}") from None


def _spec(cfg: Config, model_type: str) -> Spec:
    m = cfg.model
    # "fused": the names of the model in memory (mlp.*), which is what peft adapts.
    return Spec(model_type, "fused", m.num_layers, rope_interleave=model_type == "deepseek_v3",
                mla_nope=m.mla_qk_nope_head_dim, mla_rope=m.mla_qk_rope_head_dim, kv_lora_rank=m.mla_kv_lora_rank)


def _hf_module(name: str, spec: Spec) -> str:
    """The HF module name of our nn.Linear `name`."""
    hf = _simple_name(f"{name}.weight", spec)
    if hf is None or not hf.endswith(".weight"):
        raise ConfigError(f"our LoRA module {name} has no Hugging Face module")
    return hf.removesuffix(".weight")


def _hf_experts(name: str) -> str:
    """`layers.{i}.ffn.experts` -> `model.layers.{i}.mlp.experts`."""
    return "model." + name.replace(".ffn.experts", ".mlp.experts")


def _suffix(hf_name: str) -> str:
    return re.sub(r"^model\.layers\.\d+\.", "", hf_name)


def _targets(adapted: list[str], every: list[str]) -> list[str]:
    """peft target names for the HF modules `adapted`: the layer-free suffix (`self_attn.q_proj`)
    where every layer's module of that kind is adapted, else the full names."""
    out = []
    for suffix in dict.fromkeys(_suffix(n) for n in adapted):
        if {n for n in adapted if _suffix(n) == suffix} == {n for n in every if _suffix(n) == suffix}:
            out.append(suffix)
        else:
            out += [n for n in adapted if _suffix(n) == suffix]
    return out


# -- layouts --------------------------------------------------------------------------------------


def _param_A(A_ERI: torch.Tensor) -> torch.Tensor:
    E, R, I = A_ERI.shape
    return A_ERI.reshape(E * R, I)  # expert-major rows


def _param_B(B_EOR: torch.Tensor) -> torch.Tensor:
    E, O, R = B_EOR.shape
    return B_EOR.permute(1, 2, 0).reshape(O, R * E)  # column r·E + e


def _unparam_A(w: torch.Tensor, E: int) -> torch.Tensor:
    return w.reshape(E, -1, w.shape[-1])


def _unparam_B(w: torch.Tensor, E: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, E).permute(2, 0, 1)


def _expert_tensors(lora: ExpertLoRA) -> dict[str, torch.Tensor]:
    """peft's (lora_A, lora_B) weights of gate_up_proj and down_proj for one ExpertLoRA."""
    (A1, B1), (A3, B3), (A2, B2) = [(A.detach().float(), B.detach().float()) for A, B in lora.pairs()]
    E, F_, r = B1.shape
    B_gate_up = B1.new_zeros(E, 2 * F_, 2 * r)
    B_gate_up[:, :F_, :r], B_gate_up[:, F_:, r:] = B1, B3
    return {"base_layer.lora_A.weight": _param_A(torch.cat([A1, A3], dim=1)),
            "base_layer.lora_B.weight": _param_B(B_gate_up),
            "lora_A.weight": _param_A(A2), "lora_B.weight": _param_B(B2)}


def _modules(model: nn.Module) -> tuple[dict[str, LoRALinear], dict[str, ExpertLoRA]]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    experts = {n: m.lora for n, m in model.named_modules() if isinstance(m, GroupedExperts) and m.lora is not None}
    return linears, experts


# -- export ---------------------------------------------------------------------------------------


def adapter_tensors(model: nn.Module, spec: Spec) -> dict[str, torch.Tensor]:
    """peft's adapter_model.safetensors of an adapted model of ours (fp32, contiguous)."""
    linears, experts = _modules(model)
    out = {}
    for name, m in linears.items():
        key = _PREFIX + _hf_module(name, spec)
        B = m.lora_B.detach().float()
        rows = _rope_rows(f"{name}.weight", spec, B.shape[0])
        out[f"{key}.lora_A.weight"] = m.lora_A.detach().float()
        out[f"{key}.lora_B.weight"] = B if rows is None else B[torch.argsort(rows)]
    for name, lora in experts.items():
        key = _PREFIX + _hf_experts(name)
        out.update({f"{key}.{leaf}": t for leaf, t in _expert_tensors(lora).items()})
    return {k: v.contiguous() for k, v in out.items()}


def adapter_config(model: nn.Module, cfg: Config, spec: Spec, base: str) -> dict:
    """adapter_config.json for `model`'s LoRA (LoraConfig's fields; peft fills the rest)."""
    linears, experts = _modules(model)
    every_linear = [_hf_module(n, spec) for n, m in model.named_modules() if isinstance(m, nn.Linear)
                    and _simple_name_ok(n, spec)]
    every_experts = [_hf_experts(n) for n, m in model.named_modules() if isinstance(m, GroupedExperts)]
    p = cfg.peft
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": p.lora_rank, "lora_alpha": p.lora_alpha, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              # peft refuses dropout on target_parameters; ours has none on experts either.
              "lora_dropout": 0.0 if experts else p.lora_dropout,
              "target_modules": _targets([_hf_module(n, spec) for n in linears], every_linear) or None,
              "target_parameters": None, "rank_pattern": {}, "alpha_pattern": {}}
    if experts:
        names = _targets([_hf_experts(n) for n in experts], every_experts)
        config["target_parameters"] = [f"{n}.{param}" for n in names for param in _EXPERT_PARAMS]
        config["rank_pattern"] = {"gate_up_proj": 2 * p.lora_rank}  # [w1; w3] at rank 2r, see above
        config["alpha_pattern"] = {"gate_up_proj": 2 * p.lora_alpha}
    return config


def _simple_name_ok(name: str, spec: Spec) -> bool:
    try:
        return _simple_name(f"{name}.weight", spec) is not None
    except HFFormatError:
        return False


def _changed_besides(trained: dict[str, torch.Tensor], lora: set[str], cfg: Config) -> list[str]:
    """Tensors of the checkpoint, other than the LoRA ones, whose values are not the base's
    (trained routers, and with them the aux-free bias; a LoRA run without peft.train_router stores
    that bias unchanged)."""
    import models
    from trainer.adapt.peft import load_base

    other = sorted(set(trained) - lora)
    if not other:
        return []
    with torch.device("cpu"):
        base = models.build_model(cfg.model, cfg.moe)
    load_base(base, cfg.peft.base, cfg)
    state = base.state_dict()
    return [n for n in other if n not in state or not torch.equal(state[n], trained[n])]


def export_peft_adapter(ckpt: str, out: str, model_type: str | None = None, dtype: str = "fp32") -> tuple[str, list[str]]:
    """Write the LoRA of checkpoint `ckpt` (a LoRA run of ours) as a peft adapter directory `out`.

    Returns:
        (the family's model_type, the files written). Raises ConfigError (one line) for a run
        that is not LoRA, or that trained something an adapter cannot carry (routers, buffers).
    """
    from trainer.adapt.hf_bridge import safetensors_open
    from trainer.adapt.hf_export import DTYPES
    from trainer.adapt.peft import load_peft_model
    from trainer.adapt.sources import resolve_checkpoint
    from trainer.checkpoint import read_model_state

    where = "export-hf --adapter-only"
    path = resolve_checkpoint(ckpt, "export-hf")
    cfg, model = load_peft_model(path)
    if cfg.peft.method != "lora":
        raise ConfigError(f"{where}: {path} is a peft.method {cfg.peft.method} checkpoint; only LoRA has a peft "
                          f"adapter form (merge-peft, then export-hf, for the others)")
    if dtype not in DTYPES:
        raise ConfigError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    linears, experts = _modules(model)
    lora = {f"{n}.{leaf}" for n in linears for leaf in ("lora_A", "lora_B")}
    lora |= {f"{n}.lora.{leaf}" for n, m in experts.items() for leaf, _ in m.named_parameters()}
    if changed := _changed_besides(read_model_state(path), lora, cfg):
        raise ConfigError(f"{where}: the run also changed {changed[0]} (peft.train_router), "
                          f"which a LoRA adapter cannot carry; merge-peft, then export-hf")
    family = _family(cfg, model_type, where)
    spec = _spec(cfg, family.model_type)
    base = cfg.peft.base
    base = os.path.abspath(base[3:]) if base.startswith("hf:") else os.path.abspath(base)
    tensors = {k: v.to(DTYPES[dtype]) for k, v in adapter_tensors(model, spec).items()}
    safetensors_open()
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(model, cfg, spec, base), f, indent=2, sort_keys=True)
    return family.model_type, [CONFIG_FILE, WEIGHTS_FILE]


# -- import ---------------------------------------------------------------------------------------


def _read_adapter(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from trainer.adapt.hf_bridge import safetensors_open

    config_file, weights_file = os.path.join(adapter_dir, CONFIG_FILE), os.path.join(adapter_dir, WEIGHTS_FILE)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise ConfigError(f"{_KEY}: {adapter_dir} is not a peft adapter directory: no {os.path.basename(file)}")
    with open(config_file) as f:
        config = json.load(f)
    with safetensors_open()(weights_file, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    # peft saves without the adapter name ("default"); a name left in a key is dropped here.
    return config, {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v.float() for k, v in tensors.items()}


def _check_config(config: dict, where: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')}; only LORA adapters import")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if config.get(key, ok) != ok:
            raise ConfigError(f"{where}: {key}={config[key]} has no equivalent in our LoRA")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        what = "bias" if config.get("bias", "none") != "none" else "modules_to_save"
        raise ConfigError(f"{where}: {what}={config[what]}: the adapter trains more than LoRA matrices")


def _pattern(config: dict, key: str, hf_name: str):
    """config[key] (r or lora_alpha), or its rank_pattern / alpha_pattern entry for `hf_name`
    (matched as peft's get_pattern_key does)."""
    patterns = config.get("rank_pattern" if key == "r" else "alpha_pattern") or {}
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", hf_name):
            return value
    return config.get(key, 8)


def _take(tensors: dict, key: str, shape: tuple, what: str, where: str) -> torch.Tensor:
    t = tensors.pop(key, None)
    if t is None:
        raise ConfigError(f"{where}: the adapter has no {key}, which {what} needs (peft.lora_targets adapts it)")
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"{where}: {key} has shape {tuple(t.shape)}, {what} needs {tuple(shape)} "
                          f"(another rank, or an adapter of another base)")
    return t


def _check_scaling(config: dict, hf_name: str, rank: int, cfg: Config, where: str) -> None:
    r, alpha = _pattern(config, "r", hf_name), _pattern(config, "lora_alpha", hf_name)
    if r != rank:
        raise ConfigError(f"{where}: {hf_name} has rank {rank} in its tensors but r={r} in {CONFIG_FILE}")
    ours = cfg.peft.lora_alpha / cfg.peft.lora_rank
    if abs(alpha / r - ours) > 1e-9 * ours:
        raise ConfigError(f"{where}: {hf_name} is scaled by lora_alpha/r = {alpha}/{r}, this run by "
                          f"peft.lora_alpha/peft.lora_rank = {cfg.peft.lora_alpha}/{cfg.peft.lora_rank}")


def _import_experts(name: str, lora: ExpertLoRA, tensors: dict, config: dict, cfg: Config,
                    where: str) -> dict[str, torch.Tensor]:
    E, r, D = lora.A_w1_ERD.shape
    F_ = lora.B_w1_EFR.shape[1]
    hf = _hf_experts(name)
    key = _PREFIX + hf
    # down_proj: rank r.
    what = f"our {name} (w2, rank {r})"
    A2 = _unparam_A(_take(tensors, f"{key}.lora_A.weight", (E * r, F_), what, where), E)
    B2 = _unparam_B(_take(tensors, f"{key}.lora_B.weight", (D, r * E), what, where), E)
    _check_scaling(config, f"{hf}.down_proj", r, cfg, where)
    # gate_up_proj: rank 2r block-diagonal (ours, exported) or rank r with A shared by w1 and w3.
    A_key, B_key = f"{key}.base_layer.lora_A.weight", f"{key}.base_layer.lora_B.weight"
    rows = tensors[A_key].shape[0] if A_key in tensors else E * r
    R = 2 * r if rows == 2 * E * r else r  # any other rank is refused by _take's shape check
    what = f"our {name} (w1 and w3, rank {r}: gate_up_proj at rank {r} or {2 * r})"
    A = _unparam_A(_take(tensors, A_key, (E * R, D), what, where), E)
    B = _unparam_B(_take(tensors, B_key, (2 * F_, R * E), what, where), E)
    _check_scaling(config, f"{hf}.gate_up_proj", R, cfg, where)
    if R == r:
        A1, A3, B1, B3 = A, A.clone(), B[:, :F_], B[:, F_:]
    else:
        if B[:, :F_, r:].abs().max() > 0 or B[:, F_:, :r].abs().max() > 0:
            raise ConfigError(f"{where}: {B_key} (rank {2 * r}) mixes gate and up rows across its two rank halves; "
                              f"ours has separate rank-{r} w1 and w3 adapters, which express only a block-diagonal one")
        A1, A3, B1, B3 = A[:, :r], A[:, r:], B[:, :F_, :r], B[:, F_:, r:]
    return {f"{name}.lora.{n}": t.contiguous() for n, t in (
        ("A_w1_ERD", A1), ("B_w1_EFR", B1), ("A_w3_ERD", A3), ("B_w3_EFR", B3), ("A_w2_ERF", A2), ("B_w2_EDR", B2))}


def adapter_state(adapter_dir: str, cfg: Config) -> dict[str, torch.Tensor]:
    """Our LoRA tensors (whole-model names, fp32) from the peft adapter in `adapter_dir`, for the
    LoRA of run `cfg` (peft.lora_rank, lora_alpha, lora_targets on its model). Every LoRA of the run
    must be in the adapter and every tensor of the adapter must be used.

    Raises:
        ConfigError: one line, naming the tensor or key that does not fit (rank, targets, shapes).
    """
    import models
    from trainer.adapt.sources import read_hf_config

    where = _KEY
    if not os.path.isdir(adapter_dir):
        raise ConfigError(f"{where}: directory not found: {adapter_dir}")
    config, tensors = _read_adapter(adapter_dir)
    _check_config(config, where)
    base = cfg.peft.base
    model_type = read_hf_config(base[3:])[1].model_type if base.startswith("hf:") else \
        _family(cfg, None, where).model_type
    spec = _spec(cfg, model_type)
    with torch.device("meta"):
        model = models.build_model(cfg.model, cfg.moe)
    apply_lora(model, cfg.peft.lora_targets, cfg.peft.lora_rank, cfg.peft.lora_alpha)
    linears, experts = _modules(model)
    state = {}
    for name, m in linears.items():
        hf = _hf_module(name, spec)
        what = f"our {name} (rank {m.rank})"
        A = _take(tensors, f"{_PREFIX}{hf}.lora_A.weight", tuple(m.lora_A.shape), what, where)
        B = _take(tensors, f"{_PREFIX}{hf}.lora_B.weight", tuple(m.lora_B.shape), what, where)
        _check_scaling(config, hf, m.rank, cfg, where)
        rows = _rope_rows(f"{name}.weight", spec, B.shape[0])
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = A, B if rows is None else B[rows]
    for name, lora in experts.items():
        state.update(_import_experts(name, lora, tensors, config, cfg, where))
    if tensors:
        extra = sorted(tensors)[0].removeprefix(_PREFIX)
        raise ConfigError(f"{where}: the adapter has {extra}, which no LoRA of this run holds "
                          f"(peft.lora_targets {cfg.peft.lora_targets} adapt other modules)")
    return state


@torch.no_grad()
def load_init_adapter(model: nn.Module, cfg: Config) -> str:
    """Copy the adapter `peft.init_adapter` into this rank's share of the live, adapted `model`
    (its experts under ep, its FSDP shard); returns a log line. No collective."""
    from parallel.materialize import load_whole_state

    state = adapter_state(cfg.peft.init_adapter, cfg)
    names = set(model.state_dict())
    load_whole_state(model, state)
    return f"peft: LoRA adapters from {cfg.peft.init_adapter} ({len(names & set(state))} tensors)"
