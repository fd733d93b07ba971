"""`sparseforge import-hf` and `sparseforge export-hf`: Hugging Face checkpoints in and out
(trainer/adapt/hf_bridge.py does the work; these parse arguments and print one summary line)."""
from __future__ import annotations

import argparse
import re

from trainer.config import ConfigError

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '20000' -> bytes (powers of 1024)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ConfigError(f"--max-shard-size: expected a size like 5GB or 500MB, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * 1024 ** ("KMGT".find(unit.upper()) + 1)) if unit else int(float(number))


def add_hf_commands(sub) -> None:
    """The import-hf and export-hf subcommands, on the CLI's subparsers."""
    imp = sub.add_parser("import-hf", help="convert a Hugging Face MoE checkpoint (safetensors) into a checkpoint "
                                           "of ours, for model.init_from, peft.base or export-hf")
    imp.add_argument("hf_dir", help="directory with config.json and *.safetensors (mixtral, qwen2_moe, olmoe, "
                                    "deepseek_v3, qwen3_moe, glm4_moe, deepseek_v2, dots1)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write (named step_XXXXXXXX), or a "
                                                  "folder to write step_00000000 in")
    exp = sub.add_parser("export-hf", help="write a checkpoint of ours as a Hugging Face model directory")
    exp.add_argument("checkpoint", help="checkpoint directory step_XXXXXXXX (or a run directory: its latest)")
    exp.add_argument("--out", required=True, help="directory to write config.json and safetensors in")
    # Checked by export_hf (one-line errors); no choices here, so the parser needs no torch import.
    exp.add_argument("--model-type", default=None,
                     help="mixtral | qwen2_moe | olmoe | deepseek_v3 | qwen3_moe | glm4_moe | deepseek_v2 | dots1 "
                          "(default: the first family that expresses the model exactly)")
    exp.add_argument("--expert-layout", default="per_expert",
                     help="per_expert (default; as save_pretrained writes, read by transformers 4.x and 5.x) or "
                          "fused (transformers 5's experts.gate_up_proj/down_proj)")
    exp.add_argument("--dtype", default="auto", help="auto (default: as the checkpoint stores each tensor; fp32 "
                                                     "from training, bf16 from a bf16 import) | fp32 | bf16 | fp16")
    exp.add_argument("--max-shard-size", default="5GB", help="larger models are sharded, with an index (default 5GB)")
    exp.add_argument("--adapter-only", action="store_true",
                     help="a LoRA checkpoint: write only its adapter, in the peft library's format "
                          "(adapter_config.json + adapter_model.safetensors), for the export-hf of its base")


def cmd_import_hf(args: argparse.Namespace) -> int:
    from trainer.adapt.hf_bridge import has_tokenizer, import_hf

    path = import_hf(args.hf_dir, args.out)
    tokenizer = f"; its tokenizer: --set data.tokenizer={args.hf_dir}" if has_tokenizer(args.hf_dir) else ""
    print(f"imported {args.hf_dir} -> {path} (start a run from it with model.init_from={path}{tokenizer})")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    if args.adapter_only:
        from trainer.adapt.peft_interop import export_peft_adapter

        model_type, files = export_peft_adapter(args.checkpoint, args.out, args.model_type, args.dtype)
        print(f"exported the LoRA of {args.checkpoint} -> {args.out} as a peft adapter for {model_type} "
              f"({args.dtype}; {', '.join(files)}); load it with peft.PeftModel.from_pretrained(base, {args.out!r}) "
              f"onto the export-hf of its base")
        return 0
    from trainer.adapt.hf_export import export_hf

    model_type, files = export_hf(args.checkpoint, args.out, args.model_type, args.expert_layout, args.dtype,
                                  parse_size(args.max_shard_size))
    shards = [f for f in files if f.endswith(".safetensors")]
    weights = "model.safetensors" if len(shards) == 1 else f"{len(shards)} safetensors shards with an index"
    extra = [f for f in files if not f.endswith((".safetensors", ".index.json"))]
    print(f"exported {args.checkpoint} -> {args.out} as {model_type} ({args.expert_layout} experts, {args.dtype}; "
          f"{weights}, {', '.join(extra)})")
    return 0


COMMANDS = {"import-hf": cmd_import_hf, "export-hf": cmd_export_hf}
