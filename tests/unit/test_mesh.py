"""Rank layout arithmetic of the mesh (pure functions; no process group is created)."""
import pytest

from parallel.mesh import group_ranks, layout
from parallel.config import ParallelConfig

LAYOUTS = [(1, 1, 1), (1, 2, 2), (1, 4, 2), (1, 4, 4), (1, 8, 2), (2, 4, 2), (2, 2, 1), (4, 2, 2), (2, 8, 4)]


@pytest.mark.parametrize("pp,dp,ep", LAYOUTS)
def test_layout_and_groups_agree(pp, dp, ep):
    world = pp * dp
    par = ParallelConfig(dp=dp, ep=ep, pp=pp)
    coords = [layout(r, world, par) for r in range(world)]
    groups = group_ranks(world, par)
    assert (len(groups["dp"]), len(groups["ep"]), len(groups["edp"])) == (pp, pp * dp // ep, pp * ep)
    for kind in ("dp", "ep", "edp", "pp"):  # each kind partitions the world
        assert sorted(r for g in groups[kind] for r in g) == list(range(world)), kind
    for r, c in enumerate(coords):
        assert r == c["pp_rank"] * dp + c["dp_rank"]
        assert c["dp_rank"] == c["edp_rank"] * ep + c["ep_rank"]  # ep groups are contiguous
        assert 0 <= c["ep_rank"] < ep and 0 <= c["edp_rank"] < dp // ep
    for g in groups["dp"]:
        assert len({coords[r]["pp_rank"] for r in g}) == 1 and len(g) == dp
    for g in groups["ep"]:  # one stage and one edp index; ep ranks 0..ep-1 in group order
        assert [coords[r]["ep_rank"] for r in g] == list(range(ep))
        assert len({(coords[r]["pp_rank"], coords[r]["edp_rank"]) for r in g}) == 1
        assert g == list(range(g[0], g[0] + ep))
    for g in groups["edp"]:  # same stage and ep_rank (same experts), edp ranks in order
        assert [coords[r]["edp_rank"] for r in g] == list(range(dp // ep))
        assert len({(coords[r]["pp_rank"], coords[r]["ep_rank"]) for r in g}) == 1


def test_known_layout_pp2_dp4_ep2():
    par = ParallelConfig(dp=4, ep=2, pp=2)
    assert group_ranks(8, par) == {
        "dp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "ep": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "edp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }
    assert layout(6, 8, par) == {"pp_rank": 1, "dp_rank": 2, "ep_rank": 0, "edp_rank": 1}


def test_dp_resolved_from_world_size():
    par = ParallelConfig(ep=2)  # dp = -1: world // pp
    assert layout(3, 4, par) == {"pp_rank": 0, "dp_rank": 3, "ep_rank": 1, "edp_rank": 1}
    assert group_ranks(4, par)["edp"] == [[0, 2], [1, 3]]


def test_parallel_config_validation():
    from parallel import EP_OVERLAPS
    from trainer.config import ConfigError
    from trainer.recipe import load_config

    for strategy in EP_OVERLAPS:
        cfg = load_config(None, ["parallel.ep=2", f"parallel.ep_overlap={strategy}"], world_size=4)
        assert (cfg.parallel.ep, cfg.parallel.ep_overlap) == (2, strategy)
    bad = [(["parallel.ep_overlap=eager"], "parallel.ep_overlap"), (["parallel.ep_chunks=0"], "parallel.ep_chunks"),
           (["parallel.ep=2", "moe.num_experts=0"], "needs an MoE model"),
           (["parallel.ep=3"], "not divisible by parallel.ep=3")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides, world_size=6)
