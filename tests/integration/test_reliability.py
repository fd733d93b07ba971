"""Reliability at scale with real processes (tests/helpers/reliability_drills.py runs the drills;
so does benchmarks/fault_drills.py): background checkpoints equal synchronous ones, kill -9
during a background write and of one rank during a synchronous save, a full disk. The lost-node drill is in tests/integration/test_multinode.py."""
import pytest

from tests.helpers import reliability_drills as rd

pytestmark = pytest.mark.integration


def _check(result):
    details = {k: v for k, v in result.items() if k != "stderr"}
    assert result["passed"], f"{details}\n{result.get('stderr', '')}"


@pytest.fixture(scope="module")
def async_vs_sync(tmp_path_factory):
    result = rd.drill_async_equals_sync(str(tmp_path_factory.mktemp("async")))
    _check(result)
    return result


def test_background_saves_write_the_tensors_of_synchronous_ones(async_vs_sync):
    assert async_vs_sync["differing"] == []


def test_kill_during_a_background_write_keeps_the_previous_checkpoint(async_vs_sync, tmp_path):
    result = rd.drill_kill_during_background_write(str(tmp_path), async_vs_sync)
    _check(result)
    assert 0 <= result["redone_steps"][0] <= 2 * rd.EVERY


def test_kill_of_one_rank_during_a_synchronous_save_keeps_the_previous_checkpoint(async_vs_sync, tmp_path):
    """Rank 1 SIGKILLed while step 8's shards are written (2 ranks, default synchronous save): step 8
    is never published nor chosen, the rerun resumes from step 4 with the uninterrupted losses."""
    result = rd.drill_kill_mid_save_ranks(str(tmp_path), async_vs_sync)
    _check(result)
    assert result["shards_at_kill"] and not result["published"], result["shards_at_kill"]
    assert result["latest"].endswith("step_00000004")


@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, on_error):
    reason = rd.full_disk_unavailable()
    if reason:
        pytest.skip(reason)
    result = rd.drill_full_disk(str(tmp_path), on_error)
    _check(result)
    line = result["error_line"]
    assert "step_00000008.tmp" in line and "MB free" in line and "needs about" in line
