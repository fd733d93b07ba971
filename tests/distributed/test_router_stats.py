"""Router statistics and aux-loss-free balancing on 2 gloo ranks.

Each rank records the loads its own router produced at every step (by wrapping the router statistics'
`pop_step_loads`, trainer/router_stats.py); the test then checks what the run did against references computed here from
those per-rank loads: the bias of a single-process update on the summed loads, the logged loads
and ratios of the global batch, and the loads behind each heatmap.
"""
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

UPDATE_RATE = 0.01
STEPS = 4
SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=2",
         "moe.expert_ffn_dim=64", "logging.wandb=false", "logging.progress_bar=false",
         "train.log_every=1", "eval.every=0", "eval.batches=2", "optim.warmup_steps=2",
         f"train.steps={STEPS}", "train.micro_batch_size=4", "checkpoint.enabled=false",
         "logging.heatmap_every=2"]


def _train_recording(rank, world_size, overrides, run_dir):
    import trainer.loop as loop
    import trainer.plots as plots
    import trainer.router_stats as router_stats
    from models.moe import moe_layers
    from parallel import unwrap

    torch.set_num_threads(1)
    step_loads, heatmaps = [], {}
    real_pop, real_save = router_stats.pop_step_loads, plots.save_expert_load_heatmap

    def pop_recording(model):
        loads_LE = real_pop(model)
        step_loads.append(loads_LE.clone())
        return loads_LE

    def save_recording(loads_LE, step, run_dir, title=""):
        heatmaps[step] = loads_LE.clone()
        return real_save(loads_LE, step, run_dir, title)

    router_stats.pop_step_loads = pop_recording
    plots.save_expert_load_heatmap = save_recording
    os.makedirs(run_dir, exist_ok=True)
    trainer = loop.Trainer(load_config("recipes/llm/pretrain_tiny.yaml", SMALL + list(overrides)), run_dir)
    trainer.run()
    biases = [layer.expert_bias_E for layer in moe_layers(unwrap(trainer.model))]
    biases = None if biases[0] is None else torch.stack(biases).clone()
    return {"step_loads": torch.stack(step_loads), "biases": biases, "heatmaps": heatmaps}


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _check_logged_loads(run_dir, loads_SLE):
    """metrics.jsonl carries the loads of the global batch and the ratios computed from them."""
    records = _records(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step, record in records.items():
        loads_LE = loads_SLE[step - 1]
        assert record["moe/tokens_per_expert"] == loads_LE.round().long().tolist(), step
        ratios_L = loads_LE.double().max(dim=1).values / loads_LE.double().mean(dim=1)
        for i, ratio in enumerate(ratios_L.tolist()):
            assert record[f"moe/layer{i}/load_max_over_mean"] == pytest.approx(ratio, rel=1e-9)
        assert record["moe/load_max_over_mean"] == pytest.approx(ratios_L.mean().item(), rel=1e-9)
    return records


def _run(tmp_path, overrides):
    run_dir = str(tmp_path / "run")
    ranks = run_distributed(_train_recording, 2, overrides, run_dir)
    per_rank = [r["step_loads"] for r in ranks]  # [steps, L, E] each, this rank's own routing
    assert per_rank[0].shape == (STEPS, 2, 8)
    assert not torch.equal(per_rank[0], per_rank[1])  # different data: the sum is not 2x one rank
    return run_dir, ranks, per_rank


def test_aux_free_bias_identical_on_ranks_and_equal_to_reference(tmp_path):
    overrides = ["moe.aux_free=true", f"moe.aux_free_update_rate={UPDATE_RATE}", "moe.aux_loss_coeff=0"]
    run_dir, ranks, per_rank = _run(tmp_path, overrides)
    summed_SLE = per_rank[0] + per_rank[1]
    bias0, bias1 = ranks[0]["biases"], ranks[1]["biases"]
    assert torch.equal(bias0, bias1)
    reference_LE = torch.zeros(2, 8)
    for loads_LE in summed_SLE:  # b += u * sign(mean load - load), one update per optimizer step
        reference_LE += UPDATE_RATE * torch.sign(loads_LE.mean(dim=1, keepdim=True) - loads_LE)
    torch.testing.assert_close(bias0, reference_LE, rtol=0, atol=1e-6)
    assert bias0.abs().max() > 0

    records = _check_logged_loads(run_dir, summed_SLE)
    assert records[STEPS]["moe/aux_free_bias_abs_max"] == pytest.approx(bias0.abs().max().item())
    heatmaps = ranks[0]["heatmaps"]
    assert sorted(heatmaps) == [2, 4] and ranks[1]["heatmaps"] == {}  # rank 0 plots
    torch.testing.assert_close(heatmaps[4], summed_SLE[2:4].double().sum(dim=0))
    assert sorted(os.listdir(os.path.join(run_dir, "plots"))) == [
        "expert_load_step_00000002.png", "expert_load_step_00000004.png"]


def test_logged_loads_are_summed_over_ranks_without_aux_free(tmp_path):
    run_dir, ranks, per_rank = _run(tmp_path, [])
    assert ranks[0]["biases"] is None
    summed_SLE = per_rank[0] + per_rank[1]  # each rank only ever saw its own loads
    records = _check_logged_loads(run_dir, summed_SLE)
    # max of a sum <= sum of the maxima: the global ratio never exceeds the mean of the per-rank
    # ratios (what was logged before), and is below it when the ranks' busiest experts differ.
    global_SL = torch.tensor([[records[s][f"moe/layer{i}/load_max_over_mean"] for i in range(2)]
                              for s in range(1, STEPS + 1)], dtype=torch.float64)
    per_rank_SL = sum(r.double().max(dim=2).values / r.double().mean(dim=2) for r in per_rank) / 2
    assert (global_SL <= per_rank_SL + 1e-9).all()
    assert (global_SL < per_rank_SL - 1e-3).any()
    heatmaps = ranks[0]["heatmaps"]
    assert sorted(heatmaps) == [2, 4]
    torch.testing.assert_close(heatmaps[2], summed_SLE[0:2].double().sum(dim=0))
    torch.testing.assert_close(heatmaps[4], summed_SLE[2:4].double().sum(dim=0))
