"""Hugging Face checkpoint formats (pure: no files, no transformers import).

    families.py   config.json <-> our model/moe keys, per model_type; what each family can express
                  (no torch)
    convert.py    state-dict names, fused vs per-expert expert layouts, MLA RoPE permutation
The file I/O (safetensors, config.json, our DCP checkpoints) is trainer/adapt/hf_bridge.py.
"""
