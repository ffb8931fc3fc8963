"""The synthetic generator's two worlds: the public world and a shifted hospital world.

``"public"`` is the world of the public cohorts on which the federation's initial adapter is
pre-trained (:mod:`fedrg.model.public_init`); with it :mod:`fedrg.data.synth` writes exactly
what it wrote before worlds existed (generator version 2). ``"shifted"`` is a benchmark world
for the simulated hospitals that differs from the public one along the axes on which real
multi-site radiogenomics differs (magnitudes and sources in docs/cohort-format.md):

* **scanner and sequence**: lower resolution (through-plane and in-plane blur: thicker slices,
  smaller acquisition matrices), another lesion contrast and contrast curve (gamma), lower
  signal-to-noise, a stronger bias field;
* **expression platform and batch**: a compressed dynamic range (array-like platform), a
  gene-specific platform (probe) bias shared by every shifted hospital, per-site per-gene
  batch shifts and a per-site library shift, all larger than the public world's;
* **case mix**: IDH-mutant prevalence from glioblastoma-heavy to lower-grade-heavy centres,
  TCGA/CGGA-like codeletion and MGMT rates;
* **associations the public world lacks**: MGMT promoter methylation shows in the image
  (less oedema, less ring enhancement), and 1p/19q-codeleted tumours calcify far more often
  (susceptibility-weighted imaging) -- only hospital data can teach these.

Everything a hospital draws comes from ``numpy.random.default_rng([seed, hospital, ...])``
streams of its own, so a seed still gives identical bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrg.errors import ConfigError

PUBLIC_WORLD = "public"
SHIFTED_WORLD = "shifted"
WORLDS = (PUBLIC_WORLD, SHIFTED_WORLD)

#: Bumped whenever the shifted world's output changes (the simulate cohort cache keys on it;
#: the public world's output follows :data:`fedrg.data.synth.GENERATOR_VERSION` alone).
SHIFTED_WORLD_VERSION = 1


@dataclass(frozen=True)
class Biology:
    """The associations a world draws. The defaults are the public world's (bit for bit)."""

    mgmt_rate_mutant: float = 0.72  # P(MGMT methylated | IDH-mutant)
    mgmt_rate_wildtype: float = 0.42  # P(MGMT methylated | IDH-wildtype)
    mgmt_oedema: float = 0.0  # added to the oedema latent of an MGMT-methylated tumour
    mgmt_enhancement: float = 0.0  # added to the enhancement latent of a methylated tumour
    calcification_codeleted: float = 0.22  # P(visible calcification | oligodendroglioma)
    mgmt_expression: float = -0.55  # MGMT expression module per methylated tumour (log scale)
    plus7_minus10_wildtype: float = 0.0  # P(+7/-10 | IDH-wildtype): EGFR up, PTEN/MGMT/EBF3 down
    tumour_purity: float = 0.8  # sets the expression change of one gained / lost copy

    def copy_change(self, copies: int) -> float:
        """Log-expression change of a gene with ``copies`` extra (+) or lost (-) copies."""
        return float(np.log1p(copies * self.tumour_purity / 2.0))


PUBLIC_BIOLOGY = Biology()
SHIFTED_BIOLOGY = Biology(
    mgmt_rate_mutant=0.9,
    mgmt_rate_wildtype=0.40,
    mgmt_oedema=-0.4,
    mgmt_enhancement=-0.3,
    calcification_codeleted=0.45,
    mgmt_expression=-0.55,
    plus7_minus10_wildtype=0.9,
)


@dataclass(frozen=True)
class Range:
    """A uniform range ``[low, high]``."""

    low: float
    high: float

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class ShiftedRanges:
    """What a shifted hospital draws from (docs/cohort-format.md cites each range)."""

    p_idh: Range = Range(0.30, 0.70)
    p_codel: Range = Range(0.25, 0.60)
    mgmt_shift: Range = Range(-0.08, 0.08)
    gamma_low: Range = Range(0.55, 0.75)  # half the sites compress bright tissue ...
    gamma_high: Range = Range(1.35, 1.70)  # ... the other half expand it
    noise: Range = Range(0.07, 0.12)
    bias: Range = Range(0.20, 0.40)
    blur_slice: Range = Range(0.6, 1.2)  # Gaussian sigma in slices (4 mm): 5-8 mm thick slices
    blur_inplane: Range = Range(0.5, 1.0)  # Gaussian sigma in pixels (3 mm): smaller matrices
    lesion_contrast: Range = Range(0.55, 0.85)  # lesion-to-parenchyma contrast vs public FLAIR
    csf_level: Range = Range(0.12, 0.12)  # CSF signal (public FLAIR: 0.12 of a 0.42 parenchyma)
    platform_slope: Range = Range(0.55, 0.75)  # log-scale compression of an array platform
    library: float = 0.5  # sd of the per-site library shift (public 0.3)
    batch: float = 0.35  # sd of per-site per-gene batch shifts (public 0.15)
    probe: float = 0.7  # sd of the gene-specific platform bias shared by all shifted sites
    platform_centre: float = 3.5  # log level that the platform's compression keeps in place
    #: (gene, carrier rate) of germline polymorphisms the sites' tumour-only pipeline reports
    germline: tuple[tuple[str, float], ...] = (("IDH1", 0.103), ("TERT", 0.5))
    sequenced: Range = Range(0.1, 0.5)  # share of patients with panel sequencing (rest ./.)


SHIFTED_RANGES = ShiftedRanges()


@dataclass(frozen=True)
class SiteShift:
    """One shifted hospital's scanner and platform (drawn by :func:`draw_site_shift`)."""

    blur_slice: float
    blur_inplane: float
    lesion_contrast: float
    csf_level: float
    platform_slope: float
    platform_centre: float
    germline: tuple[tuple[str, float], ...] = ()
    sequenced: float = 1.0

    def measure_expression(self, true_log: float) -> float:
        """The platform's reading (log scale) of a true log abundance (before batch effects)."""
        return self.platform_centre + self.platform_slope * (true_log - self.platform_centre)


def check_world(world: str, *, setting: str = "data.world") -> str:
    """``world`` if it is a known world, else a :class:`ConfigError` naming the fix."""
    if world not in WORLDS:
        raise ConfigError(f"{setting}={world!r} is not a synthetic world; use one of "
                          f"{', '.join(repr(w) for w in WORLDS)} (docs/cohort-format.md)")
    return world


def biology(world: str) -> Biology:
    """The associations of ``world``."""
    return SHIFTED_BIOLOGY if check_world(world) == SHIFTED_WORLD else PUBLIC_BIOLOGY


def draw_site_shift(rng: np.random.Generator, ranges: ShiftedRanges = SHIFTED_RANGES) -> SiteShift:
    """A shifted hospital's resolution, lesion contrast and expression platform."""
    return SiteShift(
        blur_slice=ranges.blur_slice.draw(rng),
        blur_inplane=ranges.blur_inplane.draw(rng),
        lesion_contrast=ranges.lesion_contrast.draw(rng),
        platform_slope=ranges.platform_slope.draw(rng),
        platform_centre=ranges.platform_centre,
        csf_level=ranges.csf_level.draw(rng),
        germline=ranges.germline,
        sequenced=ranges.sequenced.draw(rng),
    )


def probe_bias(genes: list[str], ranges: ShiftedRanges = SHIFTED_RANGES) -> dict[str, float]:
    """The shifted platform's gene-specific bias (log scale): a property of the platform and
    the gene, shared by every shifted hospital and every seed (like
    :func:`fedrg.data.synth.gene_baselines`)."""
    out = {}
    for g in genes:
        r = np.random.default_rng([0x5A1F7, *g.encode()])
        out[g] = float(r.normal(0.0, ranges.probe))
    return out
