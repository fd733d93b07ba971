"""Hugging Face checkpoint formats (pure: no files, no transformers import).

    families.py   config.json <-> our model/moe keys, per model_type; what each family can express
    convert.py    state-dict names, fused vs per-expert expert layouts, MLA RoPE permutation
The file I/O (safetensors, config.json, our DCP checkpoints) is trainer/adapt/hf_bridge.py.
"""
from models.hf.convert import EXPERT_LAYOUTS, Spec, detect_expert_layout, hf_to_ours, ours_to_hf
from models.hf.families import ARCH_KEYS, FAMILIES, Family, HFFormatError, family_of, infer_family

__all__ = ["ARCH_KEYS", "EXPERT_LAYOUTS", "FAMILIES", "Family", "HFFormatError", "Spec", "detect_expert_layout",
           "family_of", "hf_to_ours", "infer_family", "ours_to_hf"]
