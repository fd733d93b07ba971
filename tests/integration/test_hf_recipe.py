"""Hugging Face checkpoints through the real CLI: import-hf, a pretrain recipe started from
`model.init_from: hf:DIR`, export-hf of what it trained, and the one-line preflight errors.
Commands that spawn nothing run through `launch.cli.main` in this process (same code, no
interpreter start-up); the training run goes through torchrun."""
import json
import math
import os

import pytest
import torch

from tests.integration.test_cli import RECIPE, sparseforge

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

SMALL = ["data.max_bytes=200000", "data.seq_len=32", "train.micro_batch_size=4", "train.log_every=1",
         "train.steps=3", "eval.every=3", "eval.batches=1", "optim.warmup_steps=1", "logging.progress_bar=false",
         "logging.heatmap_every=0", "checkpoint.every=3"]


@torch.no_grad()
def tiny_deepseek(path) -> "transformers.PreTrainedModel":
    """A DeepSeek-V3 (MLA, sigmoid group-limited routing, a dense first layer, shared experts)
    whose vocabulary holds the byte tokenizer's 257 ids."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=260, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=4, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=16,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, initializer_range=0.1,
        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    for name, t in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            t.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def _first_batch(run_dir):
    from trainer.recipe import load_config
    from trainer.lm.data import build_text_data

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    data = build_text_data(cfg.data, cfg.train.micro_batch_size, 0, 1, cfg.train.seed)
    return next(data.train_batches())


def test_pretrain_from_hf_trains_and_exports_back(tmp_path):
    hf_dir, run_dir, out = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    hf = tiny_deepseek(hf_dir)

    # import-hf writes an ordinary checkpoint of ours (weights only, so not resumable)
    out_line = cli_ok("import-hf", str(hf_dir), "--out", str(tmp_path / "imported"))
    assert "step_00000000" in out_line and os.path.isfile(tmp_path / "imported/step_00000000/config.yaml")
    assert cli_error("run", RECIPE, "--run-dir", str(tmp_path / "r2"), "--resume",
                     str(tmp_path / "imported/step_00000000")).startswith("--resume: ")

    # The recipe is the tiny one; the architecture comes from the HF model.
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(run_dir), "--set", *SMALL, f"model.init_from=hf:{hf_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised from Hugging Face deepseek_v3 model" in proc.stdout
    with open(run_dir / "metrics.jsonl") as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    assert sorted(losses) == [1, 2, 3]
    # Step 1's loss is the HF model's own cross entropy on the first batch: it started from it.
    inputs, targets = _first_batch(run_dir)
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert losses[1] == pytest.approx(hf_loss, rel=1e-5)

    # export-hf of the trained checkpoint: transformers loads it and computes what ours does.
    assert "as deepseek_v3" in cli_ok("export-hf", str(run_dir), "--out", str(out))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    from trainer.adapt.hf_bridge import hf_config, init_model_from
    import models

    cfg = hf_config(str(out))
    ours = models.build_model(cfg.model, cfg.moe).eval()
    init_model_from(ours, str(run_dir))  # our trained checkpoint (the run's latest)
    with torch.no_grad():
        trained = back(inputs).logits
        assert (trained - ours(inputs)).abs().max().item() <= 1e-4
        assert (trained - hf(inputs).logits).abs().max().item() > 1e-3  # three steps moved the weights


def cli_ok(*argv) -> str:
    """Run a CLI command that spawns nothing (import-hf, export-hf) in this process; its stdout."""
    import contextlib
    import io

    from launch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def cli_error(*argv) -> str:
    """Run the CLI in this process (its checks are what runs before anything is spawned); the
    one line it prints on stderr, without the prefix, for exit code 2."""
    import contextlib
    import io

    from launch.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sparseforge: error: "), lines
    return lines[0][len("sparseforge: error: "):]


def test_init_from_preflight_one_line(tmp_path):
    llama = tmp_path / "llama"
    transformers.LlamaConfig(vocab_size=260, hidden_size=16, num_attention_heads=2).save_pretrained(llama)
    (tmp_path / "empty").mkdir()
    run = ["run", RECIPE, "--run-dir", str(tmp_path / "run"), "--set"]
    assert cli_error(*run, "model.init_from=hf:/nonexistent/hf") == \
        "model.init_from: Hugging Face directory not found: /nonexistent/hf"
    assert cli_error(*run, f"model.init_from=hf:{tmp_path / 'empty'}").endswith(
        "empty is not a Hugging Face model directory: no config.json")
    assert cli_error(*run, f"model.init_from=hf:{llama}") == \
        f"model.init_from: {llama}/config.json: model_type 'llama' is not supported; supported: mixtral, " \
        f"qwen2_moe, olmoe, deepseek_v3, qwen3_moe, glm4_moe, deepseek_v2, dots1, gpt_oss"
    assert cli_error(*run, f"model.init_from={llama}") == \
        f"model.init_from: {llama} is not a complete checkpoint of ours (step_XXXXXXXX with .metadata); " \
        f"for a Hugging Face directory write hf:{llama}"
    assert cli_error("export-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "x")).startswith(
        "export-hf: ")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_peft_lora_from_an_hf_base_trains_merges_and_exports_back(tmp_path):
    """peft.base: hf:DIR takes the architecture and weights of the HF model; the LoRA run trains,
    merge-peft folds the adapters in, export-hf writes what transformers loads with our logits."""
    from trainer.recipe import load_config
    from trainer.loop import Trainer

    hf_dir = tmp_path / "hf"
    hf = tiny_deepseek(hf_dir)
    overrides = SMALL + [f"peft.base=hf:{hf_dir}", "peft.lora_rank=2", "logging.wandb=false",
                         "eval.every=0", "checkpoint.keep_last=0"]
    cfg = load_config("recipes/llm/peft_lora.yaml", overrides)
    assert cfg.model.attention == "mla" and cfg.moe.num_experts == 4  # the HF model's, not the recipe's
    run_dir = tmp_path / "lora"
    os.makedirs(run_dir)
    trainer = Trainer(cfg, str(run_dir))
    trainer.run()
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert 0 < next(r["peft/trainable_frac"] for r in records if "peft/trainable_frac" in r) < 0.5
    from trainer.lm.data import build_text_data

    inputs, targets = next(build_text_data(cfg.data, cfg.train.micro_batch_size, 0, 1, cfg.train.seed).train_batches())
    with torch.no_grad():  # step 1 starts from the HF weights (LoRA's B is zero)
        hf_loss = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert next(r["loss"] for r in records if r.get("step") == 1) == pytest.approx(hf_loss, rel=1e-5)

    from trainer.adapt.peft import load_peft_model

    _, adapted = load_peft_model(str(run_dir / "checkpoints" / "step_00000003"))
    cli_ok("merge-peft", str(run_dir / "checkpoints" / "step_00000003"), "--out", str(tmp_path / "merged"))
    cli_ok("export-hf", str(tmp_path / "merged"), "--out", str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"),
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        exported = back(inputs).logits
        assert (exported - adapted(inputs)).abs().max().item() <= 1e-4
        assert (exported - hf(inputs).logits).abs().max().item() > 1e-4  # the adapters changed it


@pytest.mark.parametrize("name", ["qwen3_moe", "glm4_moe", "deepseek_v2", "dots1", "gpt_oss"])
def test_pretrain_from_each_new_family(tmp_path, name):
    """model.init_from: hf:DIR for the families of issue 20 (per-head q/k norm, sliding windows,
    partial rotary, group-limited softmax routing; gpt-oss: sinks, YaRN, biased router and
    experts, the clamped SwiGLU): two steps in-process from the tiny odd-shaped
    models of the unit tests (vocabulary widened to the byte tokenizer's); step 1's loss is the
    HF model's cross entropy on that batch, and step 2 trains on."""
    from tests.unit.test_hf_checkpoint import CONFIGS
    from trainer.lm.data import build_text_data
    from trainer.loop import Trainer
    from trainer.recipe import load_config

    hf_cfg = CONFIGS[name]()
    hf_cfg.vocab_size = 260
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for buffer_name, t in hf.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    overrides = SMALL + [f"model.init_from=hf:{tmp_path / 'hf'}", "train.steps=2", "eval.every=0",
                         "checkpoint.keep_last=0", "logging.wandb=false"]
    cfg = load_config(RECIPE, overrides)
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    Trainer(cfg, str(run_dir)).run()
    with open(run_dir / "metrics.jsonl") as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    assert sorted(losses) == [1, 2] and all(map(math.isfinite, losses.values()))
    inputs, targets = next(build_text_data(cfg.data, cfg.train.micro_batch_size, 0, 1, cfg.train.seed).train_batches())
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert losses[1] == pytest.approx(hf_loss, rel=1e-5)
    assert losses[2] != losses[1]
