"""Plain torch models. Nothing here imports torch.distributed; parallel/ wraps from outside.

    config.py     ModelConfig, MoEConfig and their rules (no torch)
    registry.py   size presets (no torch)
    build.py      build_model(model_cfg, moe_cfg), param_counts(model, moe_cfg)
    llm.py, dit/  the two families; moe/ the MoE layer; attention.py, ffn.py their parts
    peft/, pruning/, hf/   adapters, compression, Hugging Face formats

Importing the package is free: `models.build_model` loads torch on first use, so the recipe
loader can read models/config.py in well under a second.
"""
_LAZY = {"build_model": "models.build", "param_counts": "models.build"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
