"""State-dict conversion between Hugging Face checkpoints and our `MoETransformer`.

    hf_tensor(key, shape, read, spec, where, experts)   one of our tensors (the source dtype),
                                                    reading only what it needs (some experts: dim-0 slices)
    check_hf_names(our_shapes, hf_names, spec, where)   every tensor present, none left over
    hf_to_ours(our_shapes, hf_names, read, spec)   our whole state dict (the source dtype) from HF tensors
    ours_to_hf(state, spec)                         (HF name, tensor) pairs, one at a time; `state`
                                                    may be a lazy mapping (each tensor read when needed)
    detect_expert_layout(hf_names, where)           "fused" | "per_expert"

Name map (HF prefix `model.layers.{i}.`, ours `layers.{i}.`):
    embed_tokens / norm / lm_head            tok_embeddings / norm / output
    input_layernorm, post_attention_layernorm   attn_norm, ffn_norm
    self_attn.{q,k,v,o}_proj, q_norm, k_norm     attn.{wq,wk,wv,wo}, q_norm, k_norm (whole projection or per head)
    self_attn.q_a_proj, q_a_layernorm, q_b_proj, q_proj, kv_a_proj_with_mqa, kv_a_layernorm,
        kv_b_proj (MLA)                      attn.wq_a, q_a_norm, wq_b, wq, wkv_a, kv_a_norm, wkv_b
    mlp.{gate,up,down}_proj (dense)          ffn.{w1,w3,w2}
    mlp.gate (+ e_score_correction_bias)     ffn.router.gate (+ expert_bias_E)
    mlp.shared_experts.{gate,up,down}_proj   ffn.shared_experts.{w1,w3,w2} (Qwen2-MoE: mlp.shared_expert,
                                             and mlp.shared_expert_gate)
    routed experts, fused layout (transformers 5 in memory):
        mlp.experts.gate_up_proj [E, 2F, D] = [w1; w3],  mlp.experts.down_proj [E, D, F] = w2
    routed experts, per-expert layout (what save_pretrained writes, and transformers 4.x):
        mlp.experts.{e}.{gate,up,down}_proj.weight; Mixtral: block_sparse_moe.experts.{e}.{w1,w3,w2}.weight
        and block_sparse_moe.gate
gpt-oss (transformers reads and writes one layout, fused and transposed, gate/up interleaved):
    self_attn.sinks                          attn.sinks
    mlp.router.weight / .bias                ffn.router.gate.weight / .bias
    mlp.experts.gate_up_proj [E, D, 2F], gate columns 0, 2, 4, ... and up columns 1, 3, 5, ...
                                             experts.w1_EFD, w3_EFD (transposed)
    mlp.experts.gate_up_proj_bias [E, 2F] (interleaved the same way)   experts.b1_EF, b3_EF
    mlp.experts.down_proj [E, F, D], down_proj_bias [E, D]              experts.w2_EDF (transposed), b2_ED
DeepSeek's interleaved RoPE (V2 always, V3 with rope_interleave, channel pairs (0,1), (2,3), ...) equals our
rotate-half RoPE on channels reordered evens-then-odds, so the rows that make the RoPE part of q
and of the shared key are permuted on import and back on export.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from models.hf.families import HFFormatError

Read = Callable[[str, "slice | None"], torch.Tensor]  # (HF name, dim-0 rows or None) -> tensor

EXPERT_LAYOUTS = ("fused", "per_expert")
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "q_norm": "q_norm", "k_norm": "k_norm",
         "wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
         "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj"}
_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_EXPERT = {"w1": "w1", "w3": "w3", "w2": "w2"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
# HF tensors that carry nothing we need: RoPE tables of old checkpoints.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_MTP_FAMILIES = ("deepseek_v3", "glm4_moe")  # checkpoints with multi-token-prediction layers after the last


@dataclass(frozen=True)
class Spec:
    """How one checkpoint lays its tensors out.

    model_type: the HF family. expert_layout: "fused" or "per_expert". rope_interleave: DeepSeek
    MLA RoPE in neighbouring pairs. num_layers, mla_nope/mla_rope/kv_lora_rank: MLA shapes for the
    RoPE row permutation (unused otherwise).
    """

    model_type: str
    expert_layout: str
    num_layers: int
    rope_interleave: bool = False
    mla_nope: int = 0
    mla_rope: int = 0
    kv_lora_rank: int = 0

    @property
    def moe_prefix(self) -> str:
        legacy_mixtral = self.model_type == "mixtral" and self.expert_layout == "per_expert"
        return "block_sparse_moe" if legacy_mixtral else "mlp"

    @property
    def shared_name(self) -> str:
        return "shared_expert" if self.model_type == "qwen2_moe" else "shared_experts"


def detect_expert_layout(hf_names, where: str) -> str:
    """'fused' (mlp.experts.gate_up_proj) or 'per_expert' (experts.{e}.*), from the tensor names."""
    names = list(hf_names)
    if any(n.endswith(".experts.gate_up_proj_blocks") for n in names):
        raise HFFormatError(f"{where}: MXFP4-quantised experts (gate_up_proj_blocks) are not supported; save a "
                            "dequantised copy with transformers first (Mxfp4Config(dequantize=True))")
    fused = any(n.endswith(".experts.gate_up_proj") for n in names)
    per_expert = any(re.search(r"\.experts\.\d+\.", n) for n in names)
    if fused and per_expert:
        raise HFFormatError(f"{where}: holds both fused (experts.gate_up_proj) and per-expert (experts.N.*) tensors")
    if not (fused or per_expert):
        raise HFFormatError(f"{where}: no routed-expert tensors (experts.gate_up_proj or experts.N.*)")
    return "fused" if fused else "per_expert"


def _simple_name(key: str, spec: Spec) -> str | None:
    """The HF name of one of our tensors that maps 1:1 (None for routed experts)."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if key in top:
        return top[key]
    match = _LAYER_KEY.match(key)
    if match is None:
        raise HFFormatError(f"our tensor {key} has no Hugging Face name")
    i, rest = match.groups()
    p = f"model.layers.{i}."
    parts = rest.split(".")
    if rest in ("attn_norm.weight", "ffn_norm.weight"):
        return p + ("input_layernorm.weight" if rest.startswith("attn") else "post_attention_layernorm.weight")
    if rest == "attn.sinks":
        return p + "self_attn.sinks"
    if parts[0] == "attn" and parts[1] in _ATTN:
        return p + f"self_attn.{_ATTN[parts[1]]}.{parts[2]}"
    moe = p + spec.moe_prefix
    if spec.model_type == "gpt_oss" and rest in ("ffn.router.gate.weight", "ffn.router.gate.bias"):
        return moe + ".router." + parts[-1]
    if rest == "ffn.router.gate.weight":
        return moe + ".gate.weight"
    if rest == "ffn.router.expert_bias_E":
        return moe + ".gate.e_score_correction_bias"
    if rest == "ffn.shared_expert_gate.weight":
        return moe + ".shared_expert_gate.weight"
    if parts[:2] == ["ffn", "shared_experts"]:
        return p + f"mlp.{spec.shared_name}.{_FFN[parts[2]]}.weight"
    if parts[0] == "ffn" and parts[1] in _FFN:  # a dense layer's FFN
        return p + f"mlp.{_FFN[parts[1]]}.weight"
    if parts[:2] == ["ffn", "experts"]:
        return None
    raise HFFormatError(f"our tensor {key} has no Hugging Face name")


def _rope_perm(n: int) -> torch.Tensor:
    """Neighbouring pairs -> rotate-half halves: new channel j holds old perm[j]."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def _rope_rows(key: str, spec: Spec, num_rows: int) -> torch.Tensor | None:
    """Row order that turns an interleaved-RoPE HF tensor into ours, for the q and kv_a projections."""
    if not spec.rope_interleave:
        return None
    rows = torch.arange(num_rows)
    R = spec.mla_rope
    if re.search(r"\.attn\.(wq|wq_b)\.weight$", key):
        head = spec.mla_nope + R
        view = rows.view(-1, head).clone()
        view[:, spec.mla_nope:] = view[:, spec.mla_nope:][:, _rope_perm(R)]
        return view.reshape(-1)
    if re.search(r"\.attn\.wkv_a\.(weight|bias)$", key):
        L = spec.kv_lora_rank
        rows[L:] = rows[L:][_rope_perm(R)]
        return rows
    return None


_GPT_OSS_EXPERT = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj", "b1": "gate_up_proj_bias",
                   "b3": "gate_up_proj_bias", "b2": "down_proj_bias"}


def _expert_source(key: str, spec: Spec, experts: range) -> tuple[str, list[str]]:
    """(w1|w3|w2|b1|b3|b2, the HF names holding experts `experts` of our stacked tensor `key`)."""
    layer, leaf = _LAYER_KEY.match(key).group(1), key.rsplit(".", 1)[1]
    w = leaf.split("_")[0]
    if spec.model_type == "gpt_oss":
        return w, [f"model.layers.{layer}.mlp.experts.{_GPT_OSS_EXPERT[w]}"]
    if spec.expert_layout == "per_expert":
        base = f"model.layers.{layer}.{spec.moe_prefix}.experts"
        names = _MIXTRAL_EXPERT if spec.model_type == "mixtral" else _FFN
        return w, [f"{base}.{e}.{names[w]}.weight" for e in experts]
    base = f"model.layers.{layer}.mlp.experts."
    return w, [base + ("down_proj" if w == "w2" else "gate_up_proj")]


def _read_experts(key: str, shape: tuple, read: Read, spec: Spec, experts: range) -> torch.Tensor:
    """Experts `experts` of one of our stacked expert tensors (w1_EFD, w3_EFD, w2_EDF)."""
    w, names = _expert_source(key, spec, experts)
    if spec.model_type == "gpt_oss":
        return _read_gpt_oss_experts(w, names[0], shape, read(names[0], slice(experts.start, experts.stop)))
    if spec.expert_layout == "per_expert":
        return torch.stack([read(n, None) for n in names])
    rows = slice(experts.start, experts.stop)
    if w == "w2":
        return read(names[0], rows)
    gate_up = read(names[0], rows)  # [E, 2F, D]: gate rows first, then up
    F_ = shape[1]
    if tuple(gate_up.shape) != (len(experts), 2 * F_, shape[2]):
        raise HFFormatError(f"{names[0]} has shape {(-1, *gate_up.shape[1:])} per expert, expected "
                            f"{(-1, 2 * F_, shape[2])}")
    return gate_up[:, :F_] if w == "w1" else gate_up[:, F_:]


def _read_gpt_oss_experts(w: str, name: str, shape: tuple, hf_E: torch.Tensor) -> torch.Tensor:
    """Our w1/w3/w2/b1/b3/b2 rows from gpt-oss's gate_up_proj [E, D, 2F] (gate, up interleaved on
    the last dim), down_proj [E, F, D] and their biases."""
    if w in ("w1", "w3"):  # our [E, F, D]
        expected = (shape[2], 2 * shape[1])
    elif w == "w2":  # our [E, D, F]
        expected = (shape[2], shape[1])
    else:  # our [E, F] (b1, b3) or [E, D] (b2)
        expected = (2 * shape[1],) if w in ("b1", "b3") else (shape[1],)
    if tuple(hf_E.shape[1:]) != expected:
        raise HFFormatError(f"{name} has shape {(-1, *hf_E.shape[1:])} per expert, expected {(-1, *expected)}")
    if w in ("w1", "w3"):
        return hf_E[..., 0 if w == "w1" else 1::2].transpose(1, 2)
    if w == "w2":
        return hf_E.transpose(1, 2)
    return hf_E[..., 0 if w == "b1" else 1::2] if w in ("b1", "b3") else hf_E


def _gpt_oss_to_hf(key: str, tensor: torch.Tensor, state) -> Iterator[tuple[str, torch.Tensor]]:
    """gpt-oss's expert tensors from our stacked w1/w2 (with w3) and b1/b2 (with b3); w3, b3: nothing."""
    layer, leaf = _LAYER_KEY.match(key).group(1), key.rsplit(".", 1)[1]
    w = leaf.split("_")[0]
    if w in ("w3", "b3"):
        return
    base = f"model.layers.{layer}.mlp.experts."
    if w == "w1":  # [E, F, D] twice -> [E, D, F, 2] -> [E, D, 2F]: gate, up, gate, up, ...
        up = state[key.replace("w1_EFD", "w3_EFD")]
        yield base + "gate_up_proj", torch.stack([tensor.transpose(1, 2), up.transpose(1, 2)], -1).flatten(2)
    elif w == "b1":
        yield base + "gate_up_proj_bias", torch.stack([tensor, state[key.replace("b1_EF", "b3_EF")]], -1).flatten(1)
    elif w == "w2":
        yield base + "down_proj", tensor.transpose(1, 2)
    elif w == "b2":
        yield base + "down_proj_bias", tensor


def hf_sources(key: str, shape: tuple, spec: Spec) -> list[str]:
    """The HF tensor names our tensor `key` (of the unsharded `shape`) is made from."""
    name = _simple_name(key, spec)
    return [name] if name is not None else _expert_source(key, spec, range(shape[0]))[1]


def hf_tensor(key: str, shape: tuple, read: Read, spec: Spec, where: str,
              experts: range | None = None) -> torch.Tensor:
    """Our tensor `key` (contiguous, in the checkpoint's dtype: a bf16 source stays bf16, the
    caller casts) from a Hugging Face checkpoint, reading only what it needs.

    Args:
        shape: its unsharded shape in our model.
        read: (HF name, rows or None) -> tensor; rows a slice of dim 0 (a fused expert tensor).
        experts: for a routed-expert tensor, the global expert ids to read (default all): the
            result then has len(experts) rows, e.g. only the experts this rank holds.
    """
    name = _simple_name(key, spec)
    if name is None:
        experts = range(shape[0]) if experts is None else experts
        tensor = _read_experts(key, shape, read, spec, experts)
        shape = (len(experts), *shape[1:])
        what = f"{re.sub(r'experts[.]0[.]', 'experts.*.', hf_sources(key, (1, *shape[1:]), spec)[0])} " \
               f"stacked over experts have shape"
    else:
        tensor, what = read(name, None), f"{name} has shape"
    if tuple(tensor.shape) != tuple(shape):
        raise HFFormatError(f"{where}: {what} {tuple(tensor.shape)}, our {key} needs {tuple(shape)}")
    rows = _rope_rows(key, spec, tensor.shape[0])
    if rows is not None:
        tensor = tensor[rows]
    return tensor.contiguous()


def unused_hf_names(our_shapes: dict[str, tuple], hf_names, spec: Spec, tied: bool = False) -> list[str]:
    """HF tensors that no tensor of ours is made from (RoPE tables, a tied lm_head and DeepSeek's
    multi-token-prediction layers excepted): sorted; empty when the checkpoint fits."""
    used = {n for key, shape in our_shapes.items() for n in hf_sources(key, tuple(shape), spec)}
    return sorted(n for n in set(hf_names) - used if not _ignorable(n, spec, tied))


def check_hf_names(our_shapes: dict[str, tuple], hf_names, spec: Spec, where: str, tied: bool = False) -> None:
    """Every HF tensor our model needs is there and none is left over; else HFFormatError naming one."""
    hf_names = set(hf_names)
    for key, shape in our_shapes.items():
        missing = [n for n in hf_sources(key, tuple(shape), spec) if n not in hf_names]
        if missing:
            raise HFFormatError(f"{where}: tensor {missing[0]} is missing (for our {key})")
    if extra := unused_hf_names(our_shapes, hf_names, spec, tied):
        raise HFFormatError(f"{where}: {len(extra)} tensors have no place in our model, e.g. {extra[0]}")


def hf_to_ours(our_shapes: dict[str, tuple], hf_names, read: Read, spec: Spec,
               where: str, tied: bool = False) -> dict[str, torch.Tensor]:
    """Our whole state dict (contiguous, the source dtype) from a Hugging Face checkpoint.

    Args:
        our_shapes: name -> shape of every tensor of our model's state dict (the target).
        hf_names: every tensor name in the checkpoint (unused ones are an error, see `unused_hf_names`).
        read: as for `hf_tensor`. spec: the checkpoint's layout. where: the directory, for
            messages. tied: tie_embeddings.
    """
    check_hf_names(our_shapes, hf_names, spec, where, tied)
    return {key: hf_tensor(key, tuple(shape), read, spec, where) for key, shape in our_shapes.items()}


def _ignorable(name: str, spec: Spec, tied: bool) -> bool:
    if _IGNORED.search(name) or (tied and name == "lm_head.weight"):
        return True
    match = re.match(r"^model\.layers\.(\d+)\.", name)  # DeepSeek's and GLM's MTP modules follow the last layer
    return spec.model_type in _MTP_FAMILIES and match is not None and int(match.group(1)) >= spec.num_layers


def ours_to_hf(state: dict[str, torch.Tensor], spec: Spec) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of our state dict, in the layout of `spec`; the inverse
    of `hf_to_ours` (dtype unchanged). Each tensor of `state` is looked up when it is converted
    (a routed expert's w3 with its w1), so a lazy mapping keeps one or two of ours in memory."""
    for key in state:
        name = _simple_name(key, spec)
        if name is not None:
            tensor = state[key]
            rows = _rope_rows(key, spec, tensor.shape[0])
            yield name, tensor if rows is None else tensor[torch.argsort(rows)]
            continue
        leaf = key.rsplit(".", 1)[1]
        if spec.model_type == "gpt_oss":
            yield from _gpt_oss_to_hf(key, state[key], state)
            continue
        if leaf == "w3_EFD":
            continue  # written with w1 (fused) or below (per expert)
        layer, w = _LAYER_KEY.match(key).group(1), leaf.split("_")[0]
        if spec.expert_layout == "per_expert":
            for which in [key] + ([key.replace("w1_EFD", "w3_EFD")] if w == "w1" else []):
                stacked = state[which]  # w3 is looked up once w1's experts are out
                yield from zip(_expert_source(which, spec, range(stacked.shape[0]))[1], stacked.unbind(0))
                del stacked
            continue
        base, tensor = f"model.layers.{layer}.mlp.experts.", state[key]
        if w == "w2":
            yield base + "down_proj", tensor
        else:
            yield base + "gate_up_proj", torch.cat([tensor, state[key.replace("w1_EFD", "w3_EFD")]], dim=1)
