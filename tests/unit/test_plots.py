"""Expert-load heatmaps: file name, a readable PNG, values normalised per layer."""
import os

import pytest
import torch

from trainer.plots import (expert_load_figure, heatmap_path, load_shares, overload_factors,
                           save_expert_load_heatmap)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _loads():
    loads_LE = torch.tensor([[10.0, 10.0, 10.0, 10.0],  # balanced
                             [40.0, 0.0, 0.0, 0.0],  # collapsed on expert 0
                             [30.0, 10.0, 20.0, 20.0],
                             [0.0, 0.0, 0.0, 0.0]])  # no tokens: stays zero, no NaN
    return loads_LE


def test_heatmap_written_as_png_with_step_in_name(tmp_path):
    path = save_expert_load_heatmap(_loads(), 1200, str(tmp_path))
    assert path == os.path.join(str(tmp_path), "plots", "expert_load_step_00001200.png")
    assert path == heatmap_path(str(tmp_path), 1200)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert os.listdir(tmp_path / "plots") == ["expert_load_step_00001200.png"]  # no .tmp left


def test_shares_are_normalised_per_layer_and_plotted():
    shares = load_shares(_loads())
    torch.testing.assert_close(shares[:3].sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert shares[3].abs().sum() == 0
    torch.testing.assert_close(shares[2], torch.tensor([0.375, 0.125, 0.25, 0.25], dtype=torch.float64))
    factors = overload_factors(_loads())
    torch.testing.assert_close(factors[:3], torch.tensor([1.0, 4.0, 1.5], dtype=torch.float64))
    fig = expert_load_figure(_loads() * 7, step=5)  # scale-free: shares of each layer's tokens
    ax = fig.axes[0]
    plotted = torch.as_tensor(ax.images[0].get_array().data)
    torch.testing.assert_close(plotted, shares)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:3] == ["0 (1.00x)", "1 (4.00x)", "2 (1.50x)"]  # overload factor per layer
    assert "step 5" in ax.get_title()


def test_many_experts_skip_cell_labels():
    fig = expert_load_figure(torch.rand(3, 64) * 100, step=1)
    assert len(fig.axes[0].texts) == 0
    fig = expert_load_figure(torch.rand(3, 8) * 100, step=1)
    assert len(fig.axes[0].texts) == 3 * 8


@pytest.mark.parametrize("step", [0, 99999999])
def test_heatmap_name_is_zero_padded(tmp_path, step):
    assert os.path.basename(heatmap_path(str(tmp_path), step)) == f"expert_load_step_{step:08d}.png"
