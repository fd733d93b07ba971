"""Hugging Face model families: their config.json <-> our model and moe config keys.

    FAMILIES                       model_type -> Family, one module per family (models/hf/family_*.py;
                                   what they share: models/hf/family_base.py)
    family_of(hf_cfg, where)       the Family of a parsed config.json, or HFFormatError
    ARCH_KEYS                      the keys an import sets (every one of them, every time)

`Family.to_ours(hf_cfg)` returns {"model": {...}, "moe": {...}} with a value for every key of
ARCH_KEYS, so merged over a recipe it replaces the whole architecture and leaves the training
choices (loss coefficients, capacity, backend, ...) to the recipe. `Family.problems(model, moe)`
lists what the family cannot express; `Family.to_hf(model, moe)` is the config.json dict.
Pure: no transformers, no files. Shapes are checked again when the weights are converted.
"""
from __future__ import annotations

from models.hf import (family_deepseek_v2, family_deepseek_v3, family_dots1, family_glm4_moe, family_gpt_oss,
                       family_mixtral, family_olmoe, family_qwen2_moe, family_qwen3_moe)
from models.hf.family_base import ARCH_KEYS, Family, HFFormatError  # noqa: F401 - the API

__all__ = ["ARCH_KEYS", "FAMILIES", "Family", "HFFormatError", "family_of", "infer_family"]

# Order matters for infer_family (the first that expresses an architecture exactly wins).
FAMILIES = {module.FAMILY.model_type: module.FAMILY for module in (
    family_mixtral, family_qwen2_moe, family_olmoe, family_deepseek_v3,
    family_qwen3_moe, family_glm4_moe, family_deepseek_v2, family_dots1, family_gpt_oss,
)}


def family_of(hf_cfg: dict, where: str) -> Family:
    """The family named by config.json's model_type; HFFormatError for any other."""
    model_type = hf_cfg.get("model_type")
    if model_type not in FAMILIES:
        raise HFFormatError(f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def infer_family(model_cfg, moe_cfg) -> Family:
    """The first family (in FAMILIES order) that expresses this architecture exactly."""
    reasons = []
    for family in FAMILIES.values():
        try:
            family.check(model_cfg, moe_cfg)
            return family
        except HFFormatError as e:
            reasons.append(str(e))
    raise HFFormatError("no Hugging Face family fits this model: " + " | ".join(reasons))
