"""LoRA adapters in the `peft` library's format: a LoRA run of ours (attention and experts, from
`peft.base: hf:DIR`) exported with `export-hf --adapter-only` loads with peft.PeftModel onto the
transformers base with our logits; an adapter (ours, or one peft made) comes back through
`peft.init_adapter` with the same logits and trains on; an adapter of another rank, other targets
or another base is one line."""
import json
import os

import pytest
import torch

from tests.integration.test_hf_recipe import SMALL, cli_error, cli_ok

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = "recipes/llm/peft_lora.yaml"  # targets layers.*.attn.* and layers.*.ffn.experts
COMMON = SMALL + ["peft.lora_rank=2", "peft.lora_alpha=4.0", "optim.lr=2e-2", "logging.wandb=false",
                  "eval.every=0", "checkpoint.keep_last=0"]


@torch.no_grad()
def tiny_mixtral(path, hidden: int = 32) -> "transformers.PreTrainedModel":
    cfg = transformers.MixtralConfig(
        vocab_size=260, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16,
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.save_pretrained(path)
    return model


def _train(cfg_overrides, run_dir):
    from trainer.loop import Trainer
    from trainer.recipe import load_config

    cfg = load_config(LORA, cfg_overrides)
    os.makedirs(run_dir)
    Trainer(cfg, str(run_dir)).run()
    with open(run_dir / "metrics.jsonl") as f:
        return cfg, {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _peft_model(hf_dir, adapter_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_lora_exports_to_peft_and_comes_back(tmp_path):
    from safetensors.torch import load_file
    from peft.utils import get_peft_model_state_dict

    from trainer.adapt.peft import load_peft_model
    from trainer.adapt.peft_interop import adapter_state
    from trainer.lm.data import build_text_data

    hf_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    hf = tiny_mixtral(hf_dir)
    cfg, _ = _train(COMMON + [f"peft.base=hf:{hf_dir}"], tmp_path / "lora")
    ckpt = str(tmp_path / "lora" / "checkpoints" / "step_00000003")
    _, ours = load_peft_model(ckpt)
    inputs, targets = next(build_text_data(cfg.data, cfg.train.micro_batch_size, 0, 1, cfg.train.seed).train_batches())

    # Out: peft loads every tensor of the file and computes our logits.
    line = cli_ok("export-hf", ckpt, "--out", str(adapter_dir), "--adapter-only")
    assert "as a peft adapter for mixtral" in line
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert sorted(config["target_modules"]) == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                "self_attn.v_proj"]
    assert config["base_model_name_or_path"] == str(hf_dir)
    written = load_file(adapter_dir / "adapter_model.safetensors")
    loaded = _peft_model(hf_dir, adapter_dir)
    held = get_peft_model_state_dict(loaded)
    assert sorted(held) == sorted(written) and all(torch.equal(held[k], written[k]) for k in written)
    experts = loaded.base_model.model.model.layers[0].mlp.experts  # down_proj's wrapper around gate_up_proj's
    assert (experts.r["default"], experts.scaling["default"]) == (2, 2.0)
    assert (experts.base_layer.r["default"], experts.base_layer.scaling["default"]) == (4, 2.0)  # [w1; w3]: 2r, 2α
    with torch.no_grad():
        theirs, mine = loaded(inputs).logits, ours(inputs)
        assert (theirs - mine).abs().max().item() <= 1e-4
        assert (theirs - hf(inputs).logits).abs().max().item() > 1e-3  # the adapters moved it
        # ... and the experts' part of it: without the expert adapters the logits differ.
        for name, m in ours.named_modules():
            if getattr(m, "lora", None) is not None:
                m.lora.B_w2_EDR.zero_()
        assert (theirs - ours(inputs)).abs().max().item() > 1e-4

    # Back: the same tensors, bit for bit, hence the same logits; training continues from them.
    _, trained = load_peft_model(ckpt)
    state = adapter_state(str(adapter_dir), cfg)
    mine = dict(trained.named_parameters())
    assert sorted(state) == sorted(n for n, p in mine.items() if p.requires_grad)
    assert all(torch.equal(state[n], mine[n]) for n in state)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(trained(inputs).flatten(0, 1), targets.flatten()).item()
    _, losses = _train(COMMON + [f"peft.base=hf:{hf_dir}", f"peft.init_adapter={adapter_dir}"], tmp_path / "again")
    assert losses[1] == pytest.approx(loss, rel=1e-5)
    assert losses[3] < losses[1]

    # Wrong adapters fail before launch, in one line.
    run = ["run", LORA, "--run-dir", str(tmp_path / "bad"), "--set", *SMALL, f"peft.base=hf:{hf_dir}",
           f"peft.init_adapter={adapter_dir}"]
    assert cli_error(*run, "peft.lora_rank=4", "peft.lora_alpha=8.0").startswith(
        "peft.init_adapter: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (2, 32), "
        "our layers.0.attn.wq (rank 4) needs (4, 32)")
    assert cli_error(*run, "peft.lora_rank=2", "peft.lora_alpha=8.0") == (
        "peft.init_adapter: model.layers.0.self_attn.q_proj is scaled by lora_alpha/r = 4.0/2, this run by "
        "peft.lora_alpha/peft.lora_rank = 8.0/2")
    assert cli_error(*run, "peft.lora_rank=2", "peft.lora_alpha=4.0", "peft.lora_targets=[layers.*.attn.*]") == (
        "peft.init_adapter: the adapter has model.layers.0.mlp.experts.base_layer.lora_A.weight, which no LoRA of "
        "this run holds (peft.lora_targets ['layers.*.attn.*'] adapt other modules)")
    mixed_dir = tmp_path / "mixed"  # a rank-2r gate_up LoRA that is not block-diagonal: no rank-r form of ours
    os.makedirs(mixed_dir)
    (mixed_dir / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    from safetensors.torch import save_file

    save_file({**written, key: written[key] + 1e-3}, mixed_dir / "adapter_model.safetensors")
    assert cli_error(*run[:-1], f"peft.init_adapter={mixed_dir}", "peft.lora_rank=2", "peft.lora_alpha=4.0") == (
        f"peft.init_adapter: {key} (rank 4) mixes gate and up rows across its two rank halves; ours has separate "
        f"rank-2 w1 and w3 adapters, which express only a block-diagonal one")
    other_dir = tmp_path / "hf_wide"
    tiny_mixtral(other_dir, hidden=48)
    assert cli_error("run", LORA, "--run-dir", str(tmp_path / "bad"), "--set", *SMALL, f"peft.base=hf:{other_dir}",
                     f"peft.init_adapter={adapter_dir}", "peft.lora_rank=2", "peft.lora_alpha=4.0").startswith(
        "peft.init_adapter: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (2, 32), "
        "our layers.0.attn.wq (rank 2) needs (2, 48)")


@torch.no_grad()
def tiny_qwen2_moe(path) -> "transformers.PreTrainedModel":
    """Q/k/v biases, a dense first layer, a gated shared expert."""
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=260, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, mlp_only_layers=[0], max_position_embeddings=64, initializer_range=0.1,
        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.save_pretrained(path)
    return model


# Family -> (tiny model, our targets, peft's target_modules for the same modules).
FAMILIES = {
    "mixtral": (tiny_mixtral, ["layers.*.attn.*", "layers.*.ffn.experts"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen2_moe": (tiny_qwen2_moe, ["layers.*.attn.wq", "layers.1.attn.wo", "layers.*.ffn.experts",
                                   "layers.*.ffn.shared_experts.*", "layers.0.ffn.w2"],
                  ["q_proj", "layers.1.self_attn.o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                   "shared_expert.down_proj", "layers.0.mlp.down_proj"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_ways_on_random_adapters(tmp_path, family):
    """Random B everywhere (every part counts). Ours -> peft: our adapter file on the transformers
    model gives our logits. peft -> ours: an adapter peft made (rank r on gate_up_proj, one A for
    gate and up: ours with w1 and w3 sharing A) gives peft's logits here."""
    import models
    from models.peft.lora import apply_lora
    from safetensors.torch import save_file
    from trainer.adapt.hf_bridge import init_model_from
    from trainer.adapt.peft_interop import _spec, adapter_config, adapter_state, adapter_tensors
    from trainer.recipe import load_config

    make, targets, hf_targets = FAMILIES[family]
    hf_dir, ours_dir, theirs_dir = tmp_path / "hf", tmp_path / "ours", tmp_path / "theirs"
    hf = make(hf_dir)
    inputs = torch.randint(0, 260, (2, 16))
    cfg = load_config(LORA, COMMON + [f"peft.base=hf:{hf_dir}", f"peft.lora_targets={json.dumps(targets)}"])

    def our_model():
        model = models.build_model(cfg.model, cfg.moe)
        init_model_from(model, f"hf:{hf_dir}")
        apply_lora(model, cfg.peft.lora_targets, cfg.peft.lora_rank, cfg.peft.lora_alpha)
        return model.eval()

    # Ours -> peft.
    ours = our_model()
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora" in name and ("B" in name.rsplit(".", 1)[1]):
                p.normal_(0, 0.3)
    spec = _spec(cfg, family)
    os.makedirs(ours_dir)
    save_file(adapter_tensors(ours, spec), ours_dir / "adapter_model.safetensors")
    (ours_dir / "adapter_config.json").write_text(json.dumps(adapter_config(ours, cfg, spec, str(hf_dir))))
    with torch.no_grad():
        base_logits = hf(inputs).logits
        theirs = _peft_model(hf_dir, ours_dir)(inputs).logits
        assert (theirs - ours(inputs)).abs().max().item() <= 1e-4
        assert (theirs - base_logits).abs().max().item() > 1e-2

    # peft -> ours.
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=hf_targets,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager")
    theirs = peft.get_peft_model(base, lora).eval()
    theirs.save_pretrained(theirs_dir)
    ours = our_model()
    missing = ours.load_state_dict(adapter_state(str(theirs_dir), cfg), strict=False).missing_keys
    assert not [n for n in missing if "lora" in n]
    with torch.no_grad():
        theirs_logits = theirs(inputs).logits
        assert (theirs_logits - ours(inputs)).abs().max().item() <= 1e-4
        assert (theirs_logits - base_logits).abs().max().item() > 1e-2


def test_deepseek_mla_adapter_and_what_an_adapter_cannot_carry(tmp_path):
    """MLA: the q and shared-key LoRA B rows go out in DeepSeek's interleaved RoPE order. A run that
    trained its routers (weights and aux-free bias) cannot be an adapter (one line); the
    checkpoint's unchanged aux-free bias of a plain LoRA run is no obstacle."""
    from tests.integration.test_hf_recipe import tiny_deepseek
    from trainer.adapt.peft import load_peft_model

    hf_dir = tmp_path / "hf"
    tiny_deepseek(hf_dir)
    _train(COMMON + [f"peft.base=hf:{hf_dir}", "peft.train_router=true"], tmp_path / "moving")
    assert cli_error("export-hf", str(tmp_path / "moving"), "--out", str(tmp_path / "x"), "--adapter-only") == (
        "export-hf --adapter-only: the run also changed layers.1.ffn.router.expert_bias_E (peft.train_router), "
        "which a LoRA adapter cannot carry; merge-peft, then export-hf")
    cfg, _ = _train(COMMON + [f"peft.base=hf:{hf_dir}"], tmp_path / "frozen")
    cli_ok("export-hf", str(tmp_path / "frozen"), "--out", str(tmp_path / "adapter"), "--adapter-only")
    _, ours = load_peft_model(str(tmp_path / "frozen" / "checkpoints" / "step_00000003"))
    inputs = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert (_peft_model(hf_dir, tmp_path / "adapter")(inputs).logits - ours(inputs)).abs().max().item() <= 1e-4
    # ... and back, bit for bit.
    from trainer.adapt.peft_interop import adapter_state

    state = adapter_state(str(tmp_path / "adapter"), cfg)
    mine = dict(ours.named_parameters())
    assert state and all(torch.equal(state[n], mine[n]) for n in state)


@pytest.mark.distributed
def test_init_adapter_under_expert_parallelism(tmp_path):
    """Each ep rank takes its experts' share of the adapter: ep=2 (micro batch 4 on 2 ranks) has
    the losses of one process (micro batch 8) from the same peft adapter."""
    from tests.integration.test_cli import sparseforge

    hf_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)
    peft.get_peft_model(tiny_mixtral(hf_dir), lora).save_pretrained(adapter_dir)
    common = SMALL[:2] + ["train.log_every=1", "train.steps=2", "eval.every=0", "optim.warmup_steps=1",
                          "logging.progress_bar=false", "logging.heatmap_every=0", "checkpoint.every=2",
                          "logging.wandb=false", "peft.lora_rank=2", "peft.lora_alpha=4.0", f"peft.base=hf:{hf_dir}",
                          f"peft.init_adapter={adapter_dir}"]
    losses = []
    for name, extra in (("one", ["train.micro_batch_size=8"]), ("ep2", ["train.micro_batch_size=4", "parallel.ep=2"])):
        nproc = ["--nproc-per-node", "2"] if name == "ep2" else []
        proc, _ = sparseforge("run", LORA, *nproc, "--run-dir", str(tmp_path / name), "--set", *common, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"peft: LoRA adapters from {adapter_dir}" in proc.stdout
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([r["loss"] for r in map(json.loads, f) if "loss" in r])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and len(losses[0]) == 2
