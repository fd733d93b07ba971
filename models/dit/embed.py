"""DiT inputs and output: patches in, fixed 2D positions, timestep and class-label conditioning,
patches out.

Shape legend (suffixes on tensor names):
    B  images     C  channels     H, W  image height, width
    T  tokens (patches, row-major over the (H/p) x (W/p) grid)     D  model dim
    F  frequency dim of the timestep embedding     P  values per output patch (p·p·C_out)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.init import Init

EMBED_STD = 0.02  # DiT's N(0, 0.02) for the label table and the timestep MLP


def sincos_1d(dim: int, pos_M: torch.Tensor) -> torch.Tensor:
    """[M, dim]: sin(pos·ω_j) for j < dim/2, then cos(pos·ω_j); ω_j = 10000^(-j/(dim/2)) (MAE)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos_M.device) / (dim / 2)
    angles_MJ = pos_M.double()[:, None] * (1.0 / 10000 ** omega)[None, :]
    return torch.cat([angles_MJ.sin(), angles_MJ.cos()], dim=1)


def sincos_2d_pos_embed(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos positions [T, dim] (fp32) of a grid_size² token grid in row-major order.

    As DiT/MAE: the first dim/2 values encode the token's column, the last dim/2 its row (the
    MAE code's meshgrid puts w first), so DiT checkpoints see the positions they were trained on.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need d_model divisible by 4, got {dim}")
    idx_T = torch.arange(grid_size * grid_size, device=device)
    row_T, col_T = idx_T // grid_size, idx_T % grid_size
    emb_TD = torch.cat([sincos_1d(dim // 2, col_T), sincos_1d(dim // 2, row_T)], dim=1)
    return emb_TD.float()


class SinCosPositions(nn.Module):
    """The fixed positions of a DiT as a non-persistent buffer `table` [T, D], one module shared by
    the model and its first pipeline stage (materialising the stage materialises the table)."""

    def __init__(self, dim: int, grid_size: int):
        super().__init__()
        self.dim, self.grid_size = dim, grid_size
        self.register_buffer("table", torch.empty(grid_size * grid_size, dim), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Derived from the config, small: computed whole on every rank (nothing on meta)."""
        if not self.table.is_meta:
            self.table.copy_(sincos_2d_pos_embed(self.dim, self.grid_size, self.table.device))


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B, dim] fp32: cos(t·f_j), then sin(t·f_j), f_j = max_period^(-j/(dim/2)) (GLIDE, DiT).

    t may be fractional; the lowest frequency 1/max_period suits t in [0, 1000].
    """
    half = dim // 2
    freqs_F = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BF = t_B.float()[:, None] * freqs_F[None, :]
    emb = torch.cat([args_BF.cos(), args_BF.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, T, D]: a p x p convolution with stride p (a linear map per patch)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, d_model: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}")
        self.image_size, self.in_channels = image_size, in_channels
        self.grid_size = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x_BCHW.shape[1:]) != expected:
            raise ValueError(f"DiT input has shape {list(x_BCHW.shape)}, expected [B, {', '.join(map(str, expected))}]")
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)

    def init_weights(self, init: Init) -> None:
        # DiT: initialised like the linear map it is, xavier over the flattened C·p·p patch.
        init.xavier_uniform(self.proj.weight)
        init.zeros(self.proj.bias)


class TimestepEmbedder(nn.Module):
    """Float timesteps [B] -> [B, D]: sinusoidal features (F = 256) then Linear, SiLU, Linear.

    t is a float tensor: integer diffusion steps 0..num_timesteps-1, or flow time in [0, 1]
    multiplied by 1000 by the caller (the frequencies are tuned for that range).
    """

    def __init__(self, d_model: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t_B, self.frequency_dim))

    def init_weights(self, init: Init) -> None:
        for linear in (self.mlp[0], self.mlp[2]):
            init.normal(linear.weight, EMBED_STD)
            init.zeros(linear.bias)


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, D]; row `num_classes` is the null label of classifier-free guidance.

    In training mode each label becomes the null label with probability `dropout_prob` (torch
    RNG), so one model learns both the conditional and the unconditional prediction. The null
    row exists even with dropout_prob 0, so guidance can always be asked for.
    """

    def __init__(self, num_classes: int, d_model: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, d_model)

    def drop_labels(self, y_B: torch.Tensor) -> torch.Tensor:
        """The labels this forward embeds: some replaced by the null label in training."""
        if not (self.training and self.dropout_prob > 0):
            return y_B
        drop_B = torch.rand(y_B.shape, device=y_B.device) < self.dropout_prob
        return torch.where(drop_B, torch.full_like(y_B, self.num_classes), y_B)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(self.drop_labels(y_B))

    def init_weights(self, init: Init) -> None:
        init.normal(self.embedding_table.weight, EMBED_STD)


def unpatchify(x_BTP: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B, T, p·p·C] (each patch row-major over (p, p), channels last) -> [B, C, H, W]."""
    B, T, _ = x_BTP.shape
    grid, p = math.isqrt(T), patch_size
    x = x_BTP.reshape(B, grid, grid, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * p, grid * p)
