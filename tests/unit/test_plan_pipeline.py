"""The dry-run plan under pipeline parallelism: stages, layout, bubble and memory, read from the
printed text of `format_plan` (no subprocess) for the tiny recipe (4 layers, 8 experts)."""
import os
import re

import pytest

from launch.plan import activation_bytes, param_breakdown, pipeline_plan
from launch.plan_report import format_plan
from parallel.config import pp_microbatches
from trainer.recipe import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
STAGE_LINE = re.compile(r"^(\d+)\s+(\d+)\s+layers? (\d+)(?:-(\d+))?\s+(\S+)", re.M)


def plan_text(world_size, *overrides):
    cfg = load_config(RECIPE, list(overrides), world_size=world_size)
    return cfg, format_plan(cfg, world_size, nproc_per_node=world_size)


def stage_lines(text):
    """{stage: (pp_rank, [layer ids], holds)} from the pipeline section's stage table."""
    section = text.split("\npipeline: ", 1)[1].split("\nmemory per rank", 1)[0]
    stages = {}
    for stage, pp_rank, first, last, holds in STAGE_LINE.findall(section):
        stages[int(stage)] = (int(pp_rank), list(range(int(first), int(last or first) + 1)), holds)
    return stages


def layout_stage_column(text):
    """{rank: pp_stage column} from the layout table."""
    rows = text.split("rank  node  local  pp_stage", 1)[1].splitlines()[1:]
    table = {}
    for row in rows:
        if not row or not row[0].isdigit():
            break
        cells = row.split()
        table[int(cells[0])] = cells[3]
    return table


def totals(text):
    """Per-rank memory totals in bytes: one for pp == 1, one per pp rank otherwise."""
    return [float(n) * UNITS[unit] for n, unit in re.findall(r"; total ([\d.]+)([KMGT]?)B\n", text)]


def test_1f1b_pp2_stages_bubble_and_memory():
    cfg, text = plan_text(2, "parallel.pp=2", "parallel.pp_schedule=1f1b")
    m = pp_microbatches(cfg.parallel)
    assert m == 2  # default: one microbatch per stage
    assert "pipeline: schedule 1f1b, 2 stages = pp 2 x 1 per rank" in text
    assert f"{m} microbatches of {cfg.train.micro_batch_size // m} sequences per micro step" in text
    # (p-1)/(m+p-1) with p = 2, m = 2: a third of each micro step idle.
    assert f"bubble (theory): {1 / (m + 1):.1%} of each micro step idle" in text
    assert "33.3%" in text
    stages = stage_lines(text)
    assert sorted(stages) == [0, 1]
    assert [stages[s][0] for s in (0, 1)] == [0, 1]
    assert sorted(i for _, ids, _ in stages.values() for i in ids) == [0, 1, 2, 3]
    assert stages[0][2] == "embedding" and stages[1][2] == "norm+head"
    # 1f1b: pp rank i holds min(m, pp - i) microbatches; rank 1 (layers 2-3 + head) holds one.
    assert "pp rank 0 (stages 0; rank 0)" in text and "(2 microbatches in flight per stage)" in text
    first, last = (next(line for line in text.splitlines() if line.startswith(f"pp rank {r} ")) for r in (0, 1))
    assert "(1 microbatch in flight per stage)" in last
    sequences = cfg.train.micro_batch_size // m
    # Rank 0: its layers, no head, two microbatches; rank 1: its layers and the head, one.
    expected_first = 2 * activation_bytes(cfg, stages[0][1], head=False, sequences=sequences)
    expected_last = activation_bytes(cfg, stages[1][1], head=True, sequences=sequences)
    assert f"activations {expected_first / 1e6:.2f}MB" in first
    assert f"activations {expected_last / 1e6:.2f}MB" in last


def test_zbv_world4_dp2_ep2_v_shape():
    cfg, text = plan_text(4, "parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.dp=2", "parallel.ep=2")
    assert "world size 4 = pp 2 x dp 2 (ep 2 folded into dp)" in text
    assert "pipeline: schedule zbv, 4 stages = pp 2 x 2 per rank" in text
    assert "bubble (theory): ~0 (zero bubble, in theory" in text
    # rank = pp_rank * dp + dp_rank; pp rank 0 holds stages 0 and 3 (the V), pp rank 1 stages 1 and 2.
    assert layout_stage_column(text) == {0: "0,3", 1: "0,3", 2: "1,2", 3: "1,2"}
    stages = stage_lines(text)
    assert {s: v[0] for s, v in stages.items()} == {0: 0, 1: 1, 2: 1, 3: 0}
    assert [ids for _, (_, ids, _) in sorted(stages.items())] == [[0], [1], [2], [3]]
    assert stages[0][2] == "embedding" and stages[3][2] == "norm+head"
    assert stages[1][2] == stages[2][2] == "-"
    assert "pp rank 0 (stages 0,3; ranks 0-1)" in text and "pp rank 1 (stages 1,2; ranks 2-3)" in text


def test_stage_parameters_add_up_to_the_model():
    cfg = load_config(RECIPE, ["parallel.pp=2", "parallel.pp_schedule=zbv"], world_size=2)
    plan = pipeline_plan(cfg)
    total, active, routed = param_breakdown(cfg)
    assert sum(s.total for s in plan.stages) == total
    assert sum(s.active for s in plan.stages) == active
    assert sum(s.routed for s in plan.stages) == routed
    assert plan.stages[0].total - plan.stages[1].total == cfg.model.vocab_size * cfg.model.d_model  # embedding


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
@pytest.mark.parametrize("dp_ep", [(), ("parallel.dp=2", "parallel.ep=2")])
def test_pipeline_rank_needs_less_memory_than_a_whole_model_rank(schedule, dp_ep):
    """Same dp and ep, pp 1 -> 2: every pp rank holds fewer weights and activations."""
    replicas = 2 if dp_ep else 1
    _, flat = plan_text(replicas, *dp_ep)
    _, piped = plan_text(2 * replicas, "parallel.pp=2", f"parallel.pp_schedule={schedule}", *dp_ep)
    (whole,) = totals(flat)
    per_pp_rank = totals(piped)
    assert len(per_pp_rank) == 2
    assert max(per_pp_rank) < whole


def test_interleaved_bubble_and_gpipe_keeps_every_microbatch():
    _, text = plan_text(2, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b")
    # (p-1)/(v*m+p-1) with p 2, v 2, m 4 (default m: one per stage).
    assert f"bubble (theory): {1 / 9:.1%}" in text and "with p 2, v 2, m 4" in text
    assert layout_stage_column(text) == {0: "0,2", 1: "1,3"}
    _, text = plan_text(2, "parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4")
    assert text.count("(4 microbatches in flight per stage)") == 2


def test_layer_split_is_the_same_after_expert_parallelism_shards_the_experts():
    """The trainer splits stages after expert parallelism (parallel/apply.py), the plan before: a
    layer's cost must not change when each rank holds 1/ep of its experts. DeepSeek-V3-like layout:
    dense layers first, then MoE layers, ep 16."""
    import torch
    from torch import nn

    from launch.plan import meta_model
    from models.moe import expert_parameters
    from parallel.pipeline import layer_costs

    cfg = load_config(os.path.join(ROOT, "recipes", "cluster", "deepseek_v3_like_256gpu.yaml"), world_size=256)
    model = meta_model(cfg)
    whole = layer_costs(model, cfg.moe)
    for name, p in list(expert_parameters(model)):  # what expert parallelism leaves on one rank
        owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        local = torch.empty(p.shape[0] // cfg.parallel.ep, *p.shape[1:], device="meta")
        setattr(owner, attr, nn.Parameter(local, requires_grad=p.requires_grad))
    assert layer_costs(model, cfg.moe) == whole
    assert pipeline_plan(cfg, model).stages[0].layer_ids == pipeline_plan(cfg).stages[0].layer_ids == [0, 1, 2, 3]
