import pytest
import yaml

from trainer.config import Config, ConfigError, config_from_dict, config_to_dict
from trainer.recipe import load_config, save_config

RECIPE = "recipes/llm/pretrain_tiny.yaml"


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_recipe_loads_with_base_and_preset():
    cfg = load_config(RECIPE, world_size=2)
    assert cfg.data.source == "stdlib"  # from base.yaml
    assert cfg.model.preset == "tiny" and cfg.moe.num_experts == 8  # from the preset
    assert cfg.train.steps == 300  # from the recipe itself


def test_set_overrides_are_typed():
    cfg = load_config(RECIPE, ["train.steps=7", "optim.lr=1e-3", "logging.wandb=false", "moe.top_k=1"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.logging.wandb is False
    assert cfg.moe.top_k == 1
    # an int where a float is expected is fine; the recipe beats the preset, --set beats both
    assert load_config(RECIPE, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(RECIPE, ["model.d_model=64"]).model.d_model == 64


def test_unknown_key_names_full_path_and_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key train\.stpes; did you mean train\.steps\?"):
        load_config(RECIPE, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown config key trian; did you mean train\?"):
        load_config(RECIPE, ["trian.steps=3"])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got str 'many'"):
        load_config(RECIPE, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"logging\.wandb: expected bool, got int 3"):
        load_config(RECIPE, ["logging.wandb=3"])
    with pytest.raises(ConfigError, match=r"train: expected a mapping"):
        load_config(RECIPE, ["train=5"])


@pytest.mark.parametrize("override, world, message", [
    (["parallel.dp=3"], 2, r"does not match world size 2"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=3"], 2,
     r"pp_stages_per_rank=3: pp_schedule=zbv runs exactly 2 stages per rank"),
    (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_stages_per_rank=2"], 2, r"runs one stage per rank"),
    (["parallel.pp=2", "parallel.pp_layers=[1, 2]"], 2, r"pp_layers=\[1, 2\] sums to 3, model\.num_layers=4"),
    (["parallel.pp=2", "parallel.pp_layers=[4]"], 2, r"pp_layers has 1 entries for 2 pipeline stages"),
    (["parallel.pp=2", "parallel.pp_microbatches=3"], 2, r"pp_microbatches=3 does not divide train\.micro_batch_size"),
    (["parallel.pp=2", "parallel.pp_microbatches=1", "train.micro_batch_size=4"], 2, r"must be >= parallel\.pp=2"),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, r"model\.tie_embeddings: pipeline stages need untied"),
    (["parallel.pp=2", "parallel.pp_schedule=pipedream"], 2, r"parallel\.pp_schedule: 'pipedream' is not one of"),
    (["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b"], 4, r"8 stages for model\.num_layers=4"),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_microbatches=2"], 2, r"dualpipev needs >= 4"),
    (["model.num_kv_heads=3"], 1, r"num_heads=4 is not divisible by model\.num_kv_heads=3"),
    (["moe.top_k=9"], 1, r"moe\.top_k=9 must be between 1 and moe\.num_experts=8"),
    (["data.seq_len=4096"], 1, r"data\.seq_len=4096 exceeds model\.max_seq_len"),
    (["train.steps=-1"], 1, r"train\.steps: must be >= 0, got -1"),
    (["optim.lr=-1"], 1, r"optim\.lr: must be >= 0"),
    (["optim.schedule=linear"], 1, r"optim\.schedule: 'linear' is not one of cosine, wsd, constant"),
    (["model.preset=nope"], 1, r"model\.preset: unknown preset 'nope'"),
    (["model.qk_norm=true", "model.qk_norm_per_head=true"], 1,
     r"model\.qk_norm and model\.qk_norm_per_head: choose one"),
    (["model.partial_rotary_factor=0.1"], 1, r"model\.partial_rotary_factor = 3 channels: must be even"),
    (["model.sliding_window=8", "model.sliding_window_layers=[0, 9]"], 1, r"sliding_window_layers=\[0, 9\]: layer ids"),
    (["model.attention=mla", "model.sliding_window=8"], 1,
     r"model\.attn_sinks: gqa options, not for model\.attention=mla"),
    (["moe.group_score=mean"], 1, r"moe\.group_score: 'mean' is not one of top2_sum, max"),
])
def test_cross_field_checks(override, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, override, world_size=world)


@pytest.mark.parametrize("recipe, override, world, message", [
    ("recipes/dit/pretrain_digits_moe.yaml", ["data.document_mask=true"], 1,
     r"^data\.document_mask: only for model\.family=llm, not dit$"),
    (RECIPE, ["data.document_mask=true", "parallel.pp=2"], 2,
     r"^data\.document_mask: not with parallel\.pp=2 \(stages pass only hidden states\); use pp=1$"),
])
def test_document_mask_rules(recipe, override, world, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(recipe, override, world_size=world)
    assert "\n" not in str(e.value)
    assert load_config(RECIPE, ["data.document_mask=true", "parallel.ep=2"], world_size=2).data.document_mask


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = _write(tmp_path, "bad.yaml", "train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML \(line \d+\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"recipe file not found: .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"must be a mapping of sections"):
        load_config(_write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_base_chain_and_loops(tmp_path):
    _write(tmp_path, "a.yaml", {"train": {"steps": 5, "seed": 3}})
    child = _write(tmp_path, "b.yaml", {"base": "a.yaml", "train": {"steps": 9}})
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.seed) == (9, 3)
    loop = _write(tmp_path, "loop.yaml", {"base": "loop.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RECIPE, ["train.steps=11"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("recipe", [RECIPE, "recipes/dit/pretrain_digits_moe.yaml", "recipes/llm/peft_perft.yaml"])
def test_config_from_dict_rebuilds_without_the_loader(recipe):
    """What a program passes on (or builds) where pydantic is missing: the same Config back."""
    cfg = load_config(recipe, ["parallel.activation_checkpoint=block"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    partial = config_from_dict({"model": {"preset": "tiny", "d_model": 64}, "train": {"steps": 3}})
    assert (partial.model.d_model, partial.train.steps, partial.optim) == (64, 3, Config().optim)
    with pytest.raises(ConfigError, match=r"^unknown config key train\.stepz$"):
        config_from_dict({"train": {"stepz": 3}})


# -- peft: the base checkpoint and the method's fields ------------------------------------------

LORA = ["peft.method=lora", "peft.lora_targets=[layers.*.attn.*]"]


def _fake_base(tmp_path, *overrides, method="none"):
    """A directory that passes the completeness check (DCP marker files, empty) with a config.yaml:
    enough for validation and the config half of the base preflight, which read no tensors."""
    ckpt = tmp_path / "base" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    (ckpt / "extra_rank0.pt").write_bytes(b"")
    cfg = load_config(RECIPE, list(overrides))
    cfg.peft.method = method
    save_config(cfg, str(ckpt / "config.yaml"))
    return str(ckpt)


def _one_line_error(overrides, message, loader=None):
    with pytest.raises(ConfigError, match=message) as e:
        (loader or (lambda: load_config(RECIPE, overrides)))()
    assert "\n" not in str(e.value)


def _refused_before_launch(overrides, message):
    """The recipe loads, and the launcher's preflight of the files it names refuses it."""
    from launch.preflight import check_sources

    _one_line_error(None, message, loader=lambda: check_sources(load_config(RECIPE, overrides)))


@pytest.mark.parametrize("override, message", [
    (["peft.method=lora"], r"^peft\.base: required with peft\.method lora"),
    (["peft.method=full", "peft.base=/nonexistent/step_00000001"],
     r"^peft\.base: checkpoint directory not found: /nonexistent/step_00000001$"),
    (["peft.method=esft", "peft.base=hf:mistralai/Mixtral-8x7B-v0.1"],
     r"^peft\.base: Hugging Face directory not found: mistralai/Mixtral-8x7B-v0\.1$"),  # no hub access
    (["peft.method=prefix"], r"^peft\.method: 'prefix' is not one of none, full, lora, perft, esft$"),
])
def test_peft_base_is_required_and_must_exist(override, message):
    _refused_before_launch(override, message)


def test_peft_base_must_be_a_complete_checkpoint(tmp_path):
    (tmp_path / "step_00000002").mkdir()
    _refused_before_launch(LORA + [f"peft.base={tmp_path / 'step_00000002'}"],
                           r"^peft\.base: .*step_00000002 is not a complete checkpoint")


@pytest.mark.parametrize("override, message", [
    (["peft.method=lora"], r"^peft\.lora_targets: required with peft\.method lora"),
    (LORA + ["peft.lora_rank=0"], r"^peft\.lora_rank: must be >= 1, got 0$"),
    (LORA + ["peft.lora_alpha=0"], r"^peft\.lora_alpha: must be > 0, got 0\.0$"),
    (LORA + ["peft.lora_dropout=1"], r"^peft\.lora_dropout: must be in \[0, 1\), got 1\.0$"),
    (["peft.method=perft", "peft.perft_variant=X"], r"^peft\.perft_variant: 'X' is not one of S, D, R, E$"),
    (["peft.method=perft", "peft.perft_top_k=5"], r"^peft\.perft_top_k=5 must be between 1 and peft\.perft_num_adapters=4$"),
    (["peft.method=perft", "peft.perft_variant=D", "peft.perft_num_adapters=0"], r"^peft\.perft_num_adapters: must be >= 1"),
    (["peft.method=perft", "peft.perft_rank=0"], r"^peft\.perft_rank: must be >= 1, got 0$"),
    (["peft.method=esft", "peft.esft_top_p=0"], r"^peft\.esft_top_p: must be in \(0, 1\], got 0\.0$"),
    (["peft.method=esft", "peft.esft_top_p=1.5"], r"^peft\.esft_top_p: must be in \(0, 1\], got 1\.5$"),
    (["peft.method=esft", "peft.esft_calib_batches=0"], r"^peft\.esft_calib_batches: must be >= 1, got 0$"),
    (["peft.method=esft", "peft.esft_score=entropy"], r"^peft\.esft_score: 'entropy' is not one of gate_mass, token_share$"),
    (["peft.method=perft", "peft.perft_variant=E", "model.preset=tiny_dense"],
     r"^peft\.perft_variant=E: PERFT adapters sit in the MoE layers; needs an MoE model"),
    (["peft.method=esft", "model.preset=tiny_dense"], r"^peft\.method esft: trains selected experts; needs an MoE model"),
    (LORA + ["peft.train_router=true", "model.preset=tiny_dense"], r"^peft\.train_router: needs an MoE model"),
    (LORA + ["model.upcycle_from=/some/dense/step_00000001"], r"^model\.upcycle_from: not with peft\.method lora"),
    (LORA + ["prune.method=magnitude", "prune.checkpoint=/some/step_00000001"],
     r"^prune\.method: not with peft\.method lora: prune first"),
])
def test_peft_method_fields_are_checked(tmp_path, override, message):
    _one_line_error(override + [f"peft.base={_fake_base(tmp_path)}"], message)


def test_peft_recipe_with_a_base_loads(tmp_path):
    cfg = load_config(RECIPE, LORA + [f"peft.base={_fake_base(tmp_path)}"])
    assert cfg.peft.method == "lora" and cfg.peft.lora_targets == ["layers.*.attn.*"] and cfg.peft.lora_rank == 8


def test_peft_base_with_other_shapes_names_the_key(tmp_path):
    from trainer.adapt.peft import check_peft_base

    base = _fake_base(tmp_path, "model.d_model=64")
    cfg = load_config(RECIPE, LORA + [f"peft.base={base}"])
    _one_line_error(None, r"^peft\.base: model\.d_model is 64 in the base checkpoint, 128 in this run",
                    loader=lambda: check_peft_base(base, cfg))


def test_peft_base_must_not_be_an_adapter_checkpoint(tmp_path):
    from trainer.adapt.peft import check_peft_base

    base = _fake_base(tmp_path, method="lora")
    cfg = load_config(RECIPE, LORA + [f"peft.base={base}"])
    _one_line_error(None, r"^peft\.base: .* is a PEFT checkpoint \(peft\.method lora\) holding only its adapters; "
                          r"merge it first: sparseforge merge-peft",
                    loader=lambda: check_peft_base(base, cfg))


@pytest.mark.parametrize("override, message", [
    (["peft.method=lora", "peft.lora_targets=[layers.*.mlp.*]"],
     r"^peft\.lora_targets: lora target 'layers\.\*\.mlp\.\*' matches no nn\.Linear or GroupedExperts"),
    (["peft.method=perft", "moe.first_k_dense=2", "parallel.pp=2"],
     r"^parallel\.pp_layers: pipeline stage 0 \(layers 0-1\) has nothing to train under peft\.method perft"),
    (["peft.method=esft", "moe.first_k_dense=1", "parallel.pp=2", "parallel.pp_layers=[1, 3]"],
     r"^parallel\.pp_layers: pipeline stage 0 \(layer 0\) has nothing to train under peft\.method esft"),
])
def test_peft_adapters_are_checked_on_a_meta_model(tmp_path, override, message):
    from trainer.adapt.peft import check_peft_model

    cfg = load_config(RECIPE, override + [f"peft.base={_fake_base(tmp_path)}"], world_size=2)
    _one_line_error(None, message, loader=lambda: check_peft_model(cfg))
    ok = load_config(RECIPE, ["peft.method=perft", "parallel.pp=2", f"peft.base={_fake_base(tmp_path / 'ok')}"])
    check_peft_model(ok)  # every stage holds MoE layers
