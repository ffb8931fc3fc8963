"""Small trainable encoders: image (2D/3D CNN with GroupNorm) and genomics (MLP).

Only layer types Opacus computes per-sample gradients for (Conv, GroupNorm, Linear);
no BatchNorm, no bare ``nn.Parameter``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedrg.model.radiomics import FEATURE_COUNT, standardised_radiomic_features


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
    radiomics
        Also feed the standardised first-order radiomic features
        (:mod:`fedrg.model.radiomics`, parameter-free) into the output layer, beside the
        pooled CNN features.
    """

    def __init__(self, mode: str, width: int, image_shape: list[int], norm: str = "group",
                 radiomics: bool = False):
        super().__init__()
        self.radiomics = radiomics
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
        extra = FEATURE_COUNT if radiomics else 0
        self.out = nn.Linear(2 * c_in + extra, width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.features(image)
        flat = h.flatten(2)
        parts = [flat.mean(-1), flat.amax(-1)]
        if self.radiomics:
            parts.append(standardised_radiomic_features(image).to(flat.dtype))
        return torch.nn.functional.silu(self.out(torch.cat(parts, dim=-1)))


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
    """Image features (+ the genomics side) -> one logit per marker, two ways at once.

    ``hidden = silu(image_fc(image) + other_fc(other))``: ``other`` (genomics features and
    the has-genomics flag) enters additively without a bias, so with ``other = 0`` the same
    head answers from the image alone. :meth:`forward` returns both the fused logits and the
    image-only logits (``other`` withheld) from one call of each layer, which keeps every
    layer's per-sample gradients well defined for Opacus.
    """

    def __init__(self, image_features: int, other_features: int, width: int, markers: int):
        super().__init__()
        self.image_fc = nn.Linear(image_features, width)
        self.other_fc = nn.Linear(other_features, width, bias=False)
        self.out = nn.Linear(width, markers)

    def forward(self, image: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused_logits, image_only_logits)``, each ``[B, markers]``."""
        from_image = self.image_fc(image)
        hidden = torch.stack([from_image + self.other_fc(other), from_image], dim=1)
        logits = self.out(torch.nn.functional.silu(hidden))
        return logits[:, 0], logits[:, 1]
