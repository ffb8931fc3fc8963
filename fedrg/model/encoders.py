"""Small trainable encoders: image (2D/3D CNN with GroupNorm) and genomics (MLP).

Only layer types Opacus computes per-sample gradients for (Conv, GroupNorm, Linear);
no BatchNorm, no bare ``nn.Parameter``.
"""

from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ImageEncoder(nn.Module):
    """Strided CNN -> global average + max pooling -> ``width`` features.

    Parameters
    ----------
    mode
        ``"2d"`` (input ``[B,1,H,W]``) or ``"3d"`` (input ``[B,1,D,H,W]``).
    width
        Output feature size; channels grow ``width/4 -> width/2 -> width -> width``.
    image_shape
        Spatial size; the number of stride-2 stages follows from the smallest side.
    norm
        ``"group"`` (GroupNorm after each conv) or ``"none"``. GroupNorm normalises each
        image on its own, which removes absolute intensity levels; ``"none"`` keeps them.
    """

    def __init__(self, mode: str, width: int, image_shape: list[int], norm: str = "group"):
        super().__init__()
        conv = nn.Conv2d if mode == "2d" else nn.Conv3d
        self.mode = mode
        smallest = min(image_shape)
        stages = max(2, min(4, smallest.bit_length() - 3))  # 64 -> 4 stages (down to 4x4)
        chans = [max(8, width // 4), max(8, width // 2), width, width][:stages]
        layers: list[nn.Module] = []
        c_in = 1
        for c in chans:
            layers.append(conv(c_in, c, kernel_size=3, stride=2, padding=1))
            if norm == "group":
                layers.append(nn.GroupNorm(_groups(c), c))
            layers.append(nn.SiLU())
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(2 * c_in, width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.features(image)
        flat = h.flatten(2)
        pooled = torch.cat([flat.mean(-1), flat.amax(-1)], dim=-1)
        return torch.nn.functional.silu(self.out(pooled))


class GenomicsEncoder(nn.Module):
    """Expression panel + mutation indicators -> ``width`` features (two-layer MLP)."""

    def __init__(self, genes: int, mutations: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(genes + mutations, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, expression: torch.Tensor, mutations: torch.Tensor) -> torch.Tensor:
        x = torch.cat([expression, mutations], dim=-1)
        return torch.nn.functional.silu(self.fc2(torch.nn.functional.silu(self.fc1(x))))


class PromptProjector(nn.Module):
    """Features -> ``tokens`` prompt embeddings of size ``hidden`` (scaled to the LM's)."""

    def __init__(self, width: int, tokens: int, hidden: int):
        super().__init__()
        self.tokens = tokens
        self.hidden = hidden
        self.proj = nn.Linear(width, tokens * hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).view(features.shape[0], self.tokens, self.hidden)


class MarkerHead(nn.Module):
    """Fused representation -> one logit per marker."""

    def __init__(self, in_features: int, width: int, markers: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, markers)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.silu(self.fc1(fused)))
