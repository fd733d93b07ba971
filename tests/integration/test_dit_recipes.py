"""Each DiT recipe trains, evaluates and samples in one process for a few steps (tiny settings):
the DDPM recipe (learned sigma), the flow-matching one (Heun) and the dense baseline, plus
v-prediction, which no recipe uses. Quality is measured by the benchmarks, not here; here every
objective/sampler path runs end to end through the real Trainer and writes what the run-directory
contract promises."""
import json
import os

import pytest

from trainer.recipe import load_config

TINY = ["train.steps=6", "train.log_every=2", "train.micro_batch_size=16", "model.num_layers=2",
        "diffusion.num_samples=20", "logging.wandb=false", "logging.progress_bar=false",
        "checkpoint.enabled=false", "logging.heatmap_every=0"]


@pytest.mark.parametrize("recipe, extra", [
    ("recipes/dit/pretrain_digits_moe.yaml", ["diffusion.sample_steps=8"]),
    ("recipes/dit/pretrain_digits_flow.yaml", ["diffusion.sample_steps=4"]),
    ("recipes/dit/pretrain_digits_dense.yaml", ["diffusion.sampler=ddim", "diffusion.sample_steps=8"]),
    ("recipes/dit/pretrain_digits_moe.yaml", ["diffusion.objective=v", "model.learn_sigma=false",
                                              "diffusion.sampler=dpm_solver_pp", "diffusion.sample_steps=6"]),
])
def test_dit_recipe_trains_and_samples(tmp_path, recipe, extra):
    from trainer.loop import train

    cfg = load_config(recipe, TINY + extra)
    result = train(cfg, str(tmp_path))
    assert result.final_step == 6 and result.final_val_loss is not None
    assert 0.0 <= result.final_eval["eval/acc"] <= 1.0 and result.final_eval["eval/fd"] > 0
    assert os.path.isfile(tmp_path / "plots" / "samples_step_00000006.png")
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(l == l for l in losses)  # logged every 2 steps, finite
    assert any("diffusion/mse" in r for r in records)
    if cfg.model.learn_sigma:
        assert any("diffusion/vlb" in r for r in records)


def test_dit_trains_from_a_prepared_image_set(tmp_path, capsys):
    """prepare-data's image half, then a short run on its directory: the launcher's preflight
    checks it and the trainer memory-maps it (its split is the prepared one: 20% held out here)."""
    from launch.preflight import preflight
    from trainer.diffusion.prepare_images import prepare_images
    from trainer.loop import train

    recipe, prepared, run_dir = "recipes/dit/pretrain_digits_dense.yaml", tmp_path / "digits", tmp_path / "run"
    prepare_images(load_config(recipe, ["data.val_fraction=0.2"]), str(prepared), progress=False)
    cfg = load_config(recipe, TINY + ["train.steps=3", f"data.source={prepared}", "diffusion.sampler=ddim",
                                      "diffusion.sample_steps=2", "diffusion.num_samples=10"])
    preflight(cfg, str(run_dir), None)
    result = train(cfg, str(run_dir))
    assert result.final_step == 3 and result.final_val_loss == result.final_val_loss
    assert "1,438 training images, 359 validation images" in capsys.readouterr().err  # the run log
