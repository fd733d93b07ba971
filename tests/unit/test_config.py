import pytest
import yaml

from trainer.config import Config, ConfigError, load_config, save_config

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
    (["train.steps=0"], 1, r"train\.steps: must be > 0, got 0"),
    (["optim.lr=-1"], 1, r"optim\.lr: must be >= 0"),
    (["optim.schedule=linear"], 1, r"optim\.schedule: 'linear' is not one of cosine, wsd, constant"),
    (["model.preset=nope"], 1, r"model\.preset: unknown preset 'nope'"),
])
def test_cross_field_checks(override, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, override, world_size=world)


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
