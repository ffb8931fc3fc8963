"""Hospital-level DP (optional): clip each hospital's update, add Gaussian noise to the sum.

Patient-level DP-SGD (``fedrg.privacy.dpsgd``) protects one patient inside a hospital. This
module adds a second, coarser guarantee: the released aggregate barely depends on whether any
one *hospital* took part (DP-FedAvg, McMahan et al. 2018).

Mechanism per round, with C = ``privacy.hospital_clip`` and sigma =
``privacy.hospital_noise_multiplier``:

1. each sampled hospital clips its whole update (all adapter arrays as one vector) to L2
   norm <= C (:func:`clip_update`);
2. the server sums the clipped updates (unweighted: weighting by patient counts would let a
   large hospital move the sum by more than C) and the sum carries Gaussian noise
   N(0, sigma^2 C^2 I); the mean over n sampled hospitals therefore carries std sigma C / n.

Where the noise is added:

* **without secure aggregation** the server adds it to the mean (:func:`add_server_noise`);
* **with secure aggregation** the server only ever sees the sum, so noise must be in the
  updates before masking. Each client adds a share N(0, sigma^2 C^2 / m)
  (:func:`add_noise_share`), where m is the *smallest* number of updates the server may
  unmask (the secure-aggregation threshold / ``federation.min_hospitals``): any m or more
  surviving shares sum to std >= sigma C. Distributed noise assumes honest clients: a
  coalition of k clients that leave out (or subtract) their own shares lowers the noise to
  sigma C sqrt((m - k) / m).

Accounting: one round is a Gaussian mechanism with sensitivity C (add/remove one hospital)
and noise multiplier sigma; rounds compose under RDP (:func:`hospital_level_epsilon`). The
server draws a fixed number of hospitals per round from a public seed
(``federation.seed``), so who takes part is known to everyone and there is no amplification
by subsampling: the server accounts every round in full (``sample_rate=1.0``), whatever
``federation.fraction_train`` is. ``sample_rate < 1`` is only valid for a secret Poisson
sample of hospitals, which fedrg does not do. See ``docs/privacy.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedrg.errors import PrivacyError
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of


def update_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of an update given as a list of arrays (one flat vector)."""
    return float(math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(arrays: Sequence[np.ndarray], *, hospital_clip: float) -> tuple[list[np.ndarray], float]:
    """Scale an update so its L2 norm is at most ``hospital_clip``.

    Parameters
    ----------
    arrays
        The hospital's update (new minus global adapter arrays).
    hospital_clip
        Clipping bound C.

    Returns
    -------
    (clipped, norm)
        The clipped arrays (same shapes and dtypes) and the norm before clipping
        (keep it local: it is not private).
    """
    if not hospital_clip > 0:
        raise PrivacyError(f"privacy.hospital_clip={hospital_clip} must be > 0")
    norm = update_norm(arrays)
    factor = min(1.0, hospital_clip / (norm + 1e-12))
    clipped = [(np.asarray(a, dtype=np.float64) * factor).astype(np.asarray(a).dtype)
               for a in arrays]
    return clipped, norm


def noise_share_std(*, hospital_noise_multiplier: float, hospital_clip: float,
                    min_contributors: int) -> float:
    """Std of one client's noise share: ``sigma * C / sqrt(m)``."""
    if min_contributors < 1:
        raise PrivacyError(f"min_contributors={min_contributors} must be >= 1")
    if hospital_noise_multiplier < 0:
        raise PrivacyError(
            f"privacy.hospital_noise_multiplier={hospital_noise_multiplier} must be >= 0"
        )
    return hospital_noise_multiplier * hospital_clip / math.sqrt(min_contributors)


def _gaussian_like(arrays: Sequence[np.ndarray], std: float,
                   rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(0.0, std, size=np.shape(a)) for a in arrays]


def add_noise_share(arrays: Sequence[np.ndarray], *, hospital_noise_multiplier: float,
                    hospital_clip: float, min_contributors: int,
                    rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Client side (secure aggregation): add this client's share of the aggregate noise.

    Parameters
    ----------
    arrays
        The *clipped* update (:func:`clip_update`).
    hospital_noise_multiplier, hospital_clip
        sigma and C.
    min_contributors
        Smallest number of updates the server may sum (secure-aggregation threshold):
        any that many shares sum to std >= sigma C.
    rng
        Noise source; ``None`` = fresh OS entropy (never a seed the server knows).
    """
    std = noise_share_std(hospital_noise_multiplier=hospital_noise_multiplier,
                          hospital_clip=hospital_clip, min_contributors=min_contributors)
    rng = rng if rng is not None else np.random.default_rng()
    noise = _gaussian_like(arrays, std, rng)
    return [(np.asarray(a, dtype=np.float64) + z).astype(np.asarray(a).dtype)
            for a, z in zip(arrays, noise, strict=True)]


def privatize_update(arrays: Sequence[np.ndarray], *, hospital_noise_multiplier: float,
                     hospital_clip: float, min_contributors: int,
                     rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Client side in one call: :func:`clip_update` then :func:`add_noise_share`."""
    clipped, _ = clip_update(arrays, hospital_clip=hospital_clip)
    return add_noise_share(clipped, hospital_noise_multiplier=hospital_noise_multiplier,
                           hospital_clip=hospital_clip, min_contributors=min_contributors,
                           rng=rng)


def add_server_noise(mean_arrays: Sequence[np.ndarray], *, hospital_noise_multiplier: float,
                     hospital_clip: float, n_sampled: int,
                     rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Server side (no secure aggregation): noise the *mean* of n clipped updates.

    Adds N(0, (sigma C / n)^2) per coordinate, i.e. sigma C on the sum.
    """
    if n_sampled < 1:
        raise PrivacyError(f"n_sampled={n_sampled} must be >= 1")
    std = hospital_noise_multiplier * hospital_clip / n_sampled
    rng = rng if rng is not None else np.random.default_rng()
    noise = _gaussian_like(mean_arrays, std, rng)
    return [(np.asarray(a, dtype=np.float64) + z).astype(np.asarray(a).dtype)
            for a, z in zip(mean_arrays, noise, strict=True)]


def hospital_level_history(*, hospital_noise_multiplier: float, sample_rate: float,
                           rounds: int) -> PrivacyHistory:
    """Accounting history of the hospital-level mechanism: one step per round."""
    return PrivacyHistory([(hospital_noise_multiplier, sample_rate, rounds)])


def hospital_level_epsilon(*, hospital_noise_multiplier: float, sample_rate: float,
                           rounds: int, target_delta: float, accountant: str = "rdp") -> float:
    """Hospital-level epsilon after ``rounds`` rounds (Gaussian mechanism composed under RDP).

    Parameters
    ----------
    hospital_noise_multiplier
        sigma (noise std on the sum / C).
    sample_rate
        Poisson rate at which hospitals are sampled in secret; 1.0 (what fedrg's public
        fixed-size sampling requires) gives the bound without amplification by sampling.
    rounds
        Number of rounds in which the hospital could have been sampled.
    target_delta
        Delta; must be well below 1 / number of hospitals.
    """
    if not (0.0 < sample_rate <= 1.0):
        raise PrivacyError(f"sample_rate={sample_rate} (fraction of hospitals) must lie in (0, 1]")
    hist = hospital_level_history(hospital_noise_multiplier=hospital_noise_multiplier,
                                  sample_rate=sample_rate, rounds=rounds)
    return epsilon_of(hist, target_delta=target_delta, accountant=accountant)
