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
        return self.features_and_radiomics(image)[0]

    def features_and_radiomics(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features [B, width], standardised radiomic features [B, F] or None)``."""
        h = self.features(image)
        flat = h.flatten(2)
        parts = [flat.mean(-1), flat.amax(-1)]
        radiomic = None
        if self.radiomics:
            radiomic = standardised_radiomic_features(image).to(flat.dtype)
            parts.append(radiomic)
        return torch.nn.functional.silu(self.out(torch.cat(parts, dim=-1))), radiomic


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

    Optional *linear paths* (``image_linear``, ``genomics_linear`` > 0) add a logistic
    regression straight from low-dimensional, standardised inputs to the logits: the radiomic
    features to both answers, the genomic profile (expression, mutations, has-genomics flag)
    to the fused answer only. Few parameters with a strong signal each are what DP-SGD can
    learn in a few dozen noisy steps (docs/model.md, "Why DP inverted the multimodal markers").

    The output layer, ``other_fc`` and the linear paths start at **zero**: an untrained head
    answers 0.5 for every patient and marker, and its fused answer equals its image-only
    answer. A random initial projection of the (very informative) genomic profile or
    radiomic features would otherwise rank patients at random per marker, far from 0.5
    either way, and noisy DP-SGD steps barely move it (docs/model.md).
    """

    def __init__(self, image_features: int, other_features: int, width: int, markers: int, *,
                 image_linear: int = 0, genomics_linear: int = 0):
        super().__init__()
        self.image_fc = nn.Linear(image_features, width)
        self.other_fc = nn.Linear(other_features, width, bias=False)
        nn.init.zeros_(self.other_fc.weight)
        self.out = nn.Linear(width, markers)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.image_linear = nn.Linear(image_linear, markers, bias=False) if image_linear else None
        self.genomics_linear = (nn.Linear(genomics_linear, markers, bias=False)
                                if genomics_linear else None)
        for layer in (self.image_linear, self.genomics_linear):
            if layer is not None:
                nn.init.zeros_(layer.weight)

    def forward(self, image: torch.Tensor, other: torch.Tensor, *,
                image_inputs: torch.Tensor | None = None,
                genomics_inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused_logits, image_only_logits)``, each ``[B, markers]``.

        ``image_inputs`` / ``genomics_inputs`` feed the linear paths (required when the head
        has them; ``genomics_inputs`` must be zero for a patient without genomics).
        """
        from_image = self.image_fc(image)
        hidden = torch.stack([from_image + self.other_fc(other), from_image], dim=1)
        logits = self.out(torch.nn.functional.silu(hidden))
        fused, image_only = logits[:, 0], logits[:, 1]
        if self.image_linear is not None:
            if image_inputs is None:
                raise ValueError("MarkerHead has an image linear path: pass image_inputs")
            lin = self.image_linear(image_inputs)
            fused, image_only = fused + lin, image_only + lin
        if self.genomics_linear is not None:
            if genomics_inputs is None:
                raise ValueError("MarkerHead has a genomics linear path: pass genomics_inputs")
            fused = fused + self.genomics_linear(genomics_inputs)
        return fused, image_only
