"""Every recipe in recipes/cluster/ passes the `--dry-run` its header names, for its full world
size, and its plan shows memory per rank (below an 80 GB GPU, and the figure the recipe's header
states), the expert-parallel all-to-all per step, and, with pp > 1, the pipeline bubble."""
import glob
import os
import re
import shlex

import pytest

from launch.cli import main as sparseforge_main

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "cluster", "*.yaml")))
DEVICE_BYTES = 80e9  # an 80 GB H100; the estimate must leave the CUDA context and NCCL buffers room
UNITS = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _bytes(number: str, unit: str) -> float:
    return float(number) * UNITS.get(unit, 1)


def test_there_are_the_three_cluster_recipes():
    assert [os.path.basename(r) for r in RECIPES] == [
        "deepseek_v3_like_256gpu.yaml", "dit_moe_xl_8e2a_32gpu.yaml", "mixtral_8x7b_64gpu.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_cluster_recipe_dry_run(recipe, capsys, monkeypatch):
    with open(recipe) as f:
        header = f.read()
    command = re.search(r"^#\s+(sparseforge run \S+ .*--dry-run)$", header, re.M).group(1)
    argv = shlex.split(command)[1:]
    monkeypatch.chdir(ROOT)  # the header's recipe path is relative to the repository
    assert os.path.abspath(argv[1]) == recipe
    assert sparseforge_main(argv) == 0, capsys.readouterr().err
    plan = capsys.readouterr().out.split("\n# plan\n", 1)[1]
    nnodes, nproc = int(argv[argv.index("--nnodes") + 1]), int(argv[argv.index("--nproc-per-node") + 1])
    assert f"world size {nnodes * nproc} = " in plan and f"{nnodes} node(s) x {nproc} process(es)" in plan

    # Memory per rank: the largest below the device, and as the recipe says.
    totals = [_bytes(n, u) for n, u in re.findall(r"total ([\d.]+)([KMGT]?)B\n", plan)]
    assert totals and max(totals) < DEVICE_BYTES, max(totals)
    stated = re.search(r"largest rank ([\d.]+) GB", header).group(1)
    assert f"{max(totals) / 1e9:.2f}" == stated  # as the plan prints it

    # All-to-all bytes per step, for every rank, and non-zero.
    per_step = re.findall(r"^  per step, (each rank|pp ranks? [\d-]+): ([\d.]+)([KMGT]?)B \(", plan, re.M)
    assert per_step and all(_bytes(n, u) > 0 for _, n, u in per_step)
    assert "per MoE layer and microbatch: dispatch " in plan
    if "\npipeline: " in plan:
        bubble = re.search(r"bubble \(theory\): ([\d.]+)% of each micro step idle", plan)
        assert bubble and float(bubble.group(1)) < 20
