"""Privacy accounting for patient-level DP-SGD across rounds and runs (pure, no torch).

One hospital's dataset has one :class:`PrivacyHistory`: the list of DP-SGD segments
``(noise_multiplier, sample_rate, steps)`` that ever touched it, in the same form as an
Opacus accountant's ``history`` (and its ``state_dict()["history"]``). The history is
persisted between rounds and runs and loaded into each round's accountant, which only ever
appends to it: it is never reset. Epsilon is always computed over the whole history.

The noise multiplier is calibrated *once*, for the whole planned federation
(rounds x local steps at the hospital's sample rate), with
:func:`opacus.accountants.utils.get_noise_multiplier`. Calibrating per round (Opacus'
``make_private_with_epsilon``) assumes a zero start and overspends.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedrg.errors import PrivacyError
from fedrg.policy import ACCOUNTANTS

#: RDP orders searched by the ``rdp`` accountant: Opacus's defaults (1.1-10.9 in steps of
#: 0.1, then 12-63) extended to 1024. With the defaults alone, small-epsilon mechanisms
#: (large noise, few steps) have their optimum at the largest order, so Opacus warns
#: "optimal order is the largest alpha" every round and reports a looser epsilon.
RDP_ALPHAS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)), *(float(a) for a in range(12, 64)),
    *(float(a) for a in (72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024)),
)


def _alphas(accountant: str) -> dict[str, Any]:
    """Keyword arguments for Opacus's ``get_epsilon`` of ``accountant``."""
    return {"alphas": list(RDP_ALPHAS)} if accountant == "rdp" else {}

#: Relative precision of the noise calibration: the calibrated sigma spends at least
#: ``(1 - CALIBRATION_RTOL) * target_epsilon`` (and never more than the target).
CALIBRATION_RTOL = 0.005


@dataclass(frozen=True)
class Segment:
    """``steps`` DP-SGD steps with one noise multiplier and one Poisson sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0.0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(
                f"history segment noise_multiplier={self.noise_multiplier!r} must be a finite "
                "number >= 0"
            )
        if not (0.0 < self.sample_rate <= 1.0):
            raise PrivacyError(
                f"history segment sample_rate={self.sample_rate!r} must lie in (0, 1]"
            )
        if int(self.steps) != self.steps or self.steps < 0:
            raise PrivacyError(f"history segment steps={self.steps!r} must be an integer >= 0")

    def as_tuple(self) -> tuple[float, float, int]:
        """The Opacus form ``(noise_multiplier, sample_rate, steps)``."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


class PrivacyHistory(Sequence[Segment]):
    """Ordered, append-only list of DP-SGD segments of one dataset.

    Kept in canonical form: zero-step segments are dropped and adjacent segments with the
    same ``(noise_multiplier, sample_rate)`` are merged, exactly as Opacus' accountants do
    when they step, so a history carried across rounds equals one accountant's history
    over all the steps.

    Parameters
    ----------
    segments
        ``Segment`` objects or ``(noise_multiplier, sample_rate, steps)`` tuples.
    """

    def __init__(self, segments: Iterable[Segment | Sequence[float]] = ()) -> None:
        self._segments: list[Segment] = []
        for seg in segments:
            self._append(seg if isinstance(seg, Segment) else _segment_from(seg))

    # -- building -----------------------------------------------------------------------
    def _append(self, seg: Segment) -> None:
        if seg.steps == 0:
            return
        if self._segments:
            last = self._segments[-1]
            if (last.noise_multiplier, last.sample_rate) == (seg.noise_multiplier, seg.sample_rate):
                self._segments[-1] = Segment(last.noise_multiplier, last.sample_rate,
                                             last.steps + seg.steps)
                return
        self._segments.append(seg)

    def extended(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyHistory:
        """A new history with ``steps`` more steps at ``(noise_multiplier, sample_rate)``."""
        out = PrivacyHistory(self._segments)
        out._append(Segment(float(noise_multiplier), float(sample_rate), int(steps)))
        return out

    def __add__(self, other: PrivacyHistory) -> PrivacyHistory:
        return PrivacyHistory([*self._segments, *other])

    # -- Sequence -------------------------------------------------------------------------
    @overload
    def __getitem__(self, i: int) -> Segment: ...

    @overload
    def __getitem__(self, i: slice) -> list[Segment]: ...

    def __getitem__(self, i: int | slice) -> Segment | list[Segment]:
        return self._segments[i]

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._segments)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PrivacyHistory):
            return self._segments == other._segments
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._segments))

    def __repr__(self) -> str:
        return f"PrivacyHistory({[s.as_tuple() for s in self._segments]})"

    @property
    def total_steps(self) -> int:
        """Number of DP-SGD steps over the whole history."""
        return sum(s.steps for s in self._segments)

    # -- Opacus interop -------------------------------------------------------------------
    def to_opacus(self) -> list[tuple[float, float, int]]:
        """The ``history`` list of an Opacus accountant."""
        return [s.as_tuple() for s in self._segments]

    @classmethod
    def from_opacus(cls, history: Iterable[Sequence[float]]) -> PrivacyHistory:
        """Build from an Opacus accountant's ``history``."""
        return cls(history)

    def to_state_dict(self, accountant: str) -> dict[str, Any]:
        """An Opacus accountant ``state_dict()`` (``history`` + ``mechanism``)."""
        _check_accountant(accountant)
        return {"history": self.to_opacus(), "mechanism": accountant}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyHistory:
        """Build from an Opacus accountant ``state_dict()``."""
        if "history" not in state:
            raise PrivacyError("accountant state has no 'history'; pass accountant.state_dict()")
        return cls(state["history"])

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> list[list[float]]:
        """JSON-ready form: ``[[noise_multiplier, sample_rate, steps], ...]``."""
        return [list(s.as_tuple()) for s in self._segments]

    @classmethod
    def from_json(cls, data: str | list[Any]) -> PrivacyHistory:
        """Inverse of :meth:`to_json` (accepts the list or its JSON text)."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as err:
                raise PrivacyError(f"privacy history is not valid JSON: {err}") from None
        if not isinstance(data, list):
            raise PrivacyError(
                f"privacy history must be a JSON list of [noise_multiplier, sample_rate, steps], "
                f"got {type(data).__name__}"
            )
        return cls(data)

    def dumps(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_json(), separators=(",", ":"))


def _segment_from(seg: Sequence[float]) -> Segment:
    try:
        nm, q, steps = seg
    except (TypeError, ValueError):
        raise PrivacyError(
            f"history segment {seg!r} must be (noise_multiplier, sample_rate, steps)"
        ) from None
    if isinstance(steps, float) and not steps.is_integer():
        raise PrivacyError(f"history segment steps={steps!r} must be an integer")
    return Segment(float(nm), float(q), int(steps))


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(
            f"privacy.accountant={accountant!r} is not supported; use one of {', '.join(ACCOUNTANTS)}"
        )


def _check_delta(target_delta: float) -> None:
    if not (0.0 < target_delta < 1.0):
        raise PrivacyError(f"privacy.target_delta={target_delta!r} must lie in (0, 1)")


def epsilon_of(history: PrivacyHistory | Iterable[Sequence[float]], *, target_delta: float,
               accountant: str = "rdp") -> float:
    """Epsilon spent by a whole history at ``target_delta``.

    Parameters
    ----------
    history
        All DP-SGD segments that touched the dataset.
    target_delta
        The delta of the (epsilon, delta) guarantee.
    accountant
        ``"rdp"``, ``"prv"`` or ``"gdp"`` (Opacus accountants).

    Returns
    -------
    float
        Epsilon (0.0 for an empty history, ``inf`` if any segment has zero noise).
    """
    _check_accountant(accountant)
    _check_delta(target_delta)
    hist = history if isinstance(history, PrivacyHistory) else PrivacyHistory(history)
    if hist.total_steps == 0:
        return 0.0
    if any(s.noise_multiplier == 0.0 for s in hist):
        return math.inf
    if accountant == "gdp" and len(hist) > 1:
        raise PrivacyError(
            "privacy.accountant='gdp' cannot compose segments with different noise_multiplier "
            "or sample_rate; use 'rdp' or 'prv'"
        )
    return _epsilon_cached(tuple(hist.to_opacus()), float(target_delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], target_delta: float,
                    accountant: str) -> float:
    # pure: the same canonical history, delta and accountant always give the same epsilon,
    # so a round's budget check, its ledger entry and the next round's check share one
    # computation per process
    if accountant == "rdp":
        return _rdp_epsilon(history, target_delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=target_delta, **_alphas(accountant)))


#: This process's per-step RDP vectors, ``(noise_multiplier, sample_rate) -> vector`` over
#: :data:`RDP_ALPHAS` (read-only arrays). A hospital may preload the ones it signed earlier
#: (:mod:`fedrg.privacy.rdp_store`), so a fresh process does not recompute them.
_RDP_VECTORS: dict[tuple[float, float], Any] = {}
_RDP_VECTORS_MAX = 4096  # the oldest go first (a long-lived worker sees many mechanisms)


def _keep_rdp_vector(key: tuple[float, float], vector: Any) -> None:
    _RDP_VECTORS.pop(key, None)
    _RDP_VECTORS[key] = vector
    while len(_RDP_VECTORS) > _RDP_VECTORS_MAX:
        del _RDP_VECTORS[next(iter(_RDP_VECTORS))]


def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> Any:
    """RDP of one step of the sampled Gaussian mechanism at every order of :data:`RDP_ALPHAS`.

    The expensive part of an RDP epsilon (Opacus evaluates a series per fractional order in
    Python, about 0.1 s per mechanism); a run's rounds and a hospital's lifetime repeat the
    same few ``(noise_multiplier, sample_rate)`` pairs, so each is computed once per process.
    """
    key = (float(noise_multiplier), float(sample_rate))
    vector = _RDP_VECTORS.get(key)
    if vector is None:
        vector = compute_rdp_vector(noise_multiplier=key[0], sample_rate=key[1])
        _keep_rdp_vector(key, vector)
    return vector


def compute_rdp_vector(*, noise_multiplier: float, sample_rate: float) -> Any:
    """Opacus's ``compute_rdp`` of one step at :data:`RDP_ALPHAS` (a fresh, read-only array)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    vector = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                         orders=list(RDP_ALPHAS))
    vector.setflags(write=False)
    return vector


def known_rdp_vectors() -> dict[tuple[float, float], Any]:
    """A copy of this process's ``(noise_multiplier, sample_rate) -> RDP vector`` memo."""
    return dict(_RDP_VECTORS)


def remember_rdp_vector(*, noise_multiplier: float, sample_rate: float, vector: Any) -> None:
    """Put a per-step RDP vector (over :data:`RDP_ALPHAS`) that the caller vouches for into
    this process's memo; used only by :mod:`fedrg.privacy.rdp_store`, which verifies its
    signature first."""
    import numpy as np

    arr = np.array(vector, dtype=np.float64)
    if arr.shape != (len(RDP_ALPHAS),):
        raise PrivacyError(f"an RDP vector has shape {arr.shape}, expected ({len(RDP_ALPHAS)},)")
    arr.setflags(write=False)
    _keep_rdp_vector((float(noise_multiplier), float(sample_rate)), arr)


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], target_delta: float) -> float:
    """Exactly Opacus's ``RDPAccountant.get_epsilon`` over :data:`RDP_ALPHAS` (the same
    per-segment ``rdp * steps``, summed in history order, and the same conversion), with the
    per-step RDP vectors memoised."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_rdp_of_one_step(sigma, q) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=list(RDP_ALPHAS), rdp=rdp, delta=target_delta)
    return float(eps)


def clear_accounting_caches() -> None:
    """Forget every memoised epsilon and calibrated noise multiplier of this process."""
    _epsilon_cached.cache_clear()
    _RDP_VECTORS.clear()
    _calibrate_fresh.cache_clear()


def epsilon_after_planned(history: PrivacyHistory, *, noise_multiplier: float, sample_rate: float,
                          steps: int, target_delta: float, accountant: str = "rdp") -> float:
    """Epsilon the dataset would have spent after ``steps`` more DP-SGD steps.

    Used for budget checks before a round: nothing is trained or recorded.
    """
    planned = history.extended(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                               steps=steps)
    return epsilon_of(planned, target_delta=target_delta, accountant=accountant)


def calibrate_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                               steps: int, accountant: str = "rdp",
                               prior: PrivacyHistory | None = None) -> float:
    """Smallest noise multiplier (to ``CALIBRATION_RTOL``) meeting ``target_epsilon``.

    Calibrate once for the whole planned federation: ``steps`` must be the total number of
    local steps over all planned rounds (rounds x local steps), not one round's.

    Parameters
    ----------
    target_epsilon, target_delta
        The (epsilon, delta) to meet after all ``steps``.
    sample_rate
        Poisson sample rate (expected batch size / number of training records).
    steps
        Total planned DP-SGD steps.
    accountant
        Opacus accountant name.
    prior
        Optional history already spent; if given, the returned sigma makes
        ``prior + planned`` meet ``target_epsilon`` (raises if ``prior`` alone exceeds it).

    Returns
    -------
    float
        The noise multiplier; the planned epsilon lies in
        ``[(1 - CALIBRATION_RTOL) * target_epsilon, target_epsilon]``.
    """
    _check_accountant(accountant)
    _check_delta(target_delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"privacy.target_epsilon={target_epsilon!r} must be a finite number > 0")
    if not (0.0 < sample_rate <= 1.0):
        raise PrivacyError(
            f"sample_rate={sample_rate!r} must lie in (0, 1]; it is training.batch_size divided by "
            "the number of training records"
        )
    if steps < 1:
        raise PrivacyError(f"planned steps={steps!r} must be >= 1")
    tol = CALIBRATION_RTOL * target_epsilon
    if prior is None or prior.total_steps == 0:
        return _calibrate_fresh(float(target_epsilon), float(target_delta), float(sample_rate),
                                int(steps), accountant)
    spent = epsilon_of(prior, target_delta=target_delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"this dataset already spent epsilon={spent:.4f} >= privacy.target_epsilon="
            f"{target_epsilon}; no further training fits"
        )

    def eps(sigma: float) -> float:
        return epsilon_after_planned(prior, noise_multiplier=sigma, sample_rate=sample_rate,
                                     steps=steps, target_delta=target_delta, accountant=accountant)

    lo, hi = 0.0, 10.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise PrivacyError(
                f"cannot reach privacy.target_epsilon={target_epsilon} after the prior spend; "
                "raise target_epsilon or train fewer steps"
            )
        eps_hi = eps(hi)
    while target_epsilon - eps_hi > tol:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e < target_epsilon:
            hi, eps_hi = mid, e
        else:
            lo = mid
    return float(hi)


@functools.lru_cache(maxsize=256)
def _calibrate_fresh(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                     accountant: str) -> float:
    # pure inputs -> sigma (no prior spend); memoised per process: every round of a run
    # calibrates with identical inputs (see fedrg.privacy.calibration for the on-disk cache)
    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant,
            epsilon_tolerance=CALIBRATION_RTOL * target_epsilon, **_alphas(accountant),
        ))
    except ValueError as err:
        raise PrivacyError(
            f"cannot reach privacy.target_epsilon={target_epsilon} at target_delta="
            f"{target_delta} over {steps} steps at sample_rate={sample_rate:.4g} ({err}); "
            "raise target_epsilon or train fewer steps"
        ) from None


def check_delta(*, target_delta: float, n_patients: int) -> None:
    """Refuse a ``target_delta`` that is not well below ``1 / n_patients``.

    (epsilon, delta)-DP allows the mechanism to fail outright with probability delta; the
    trivial mechanism "publish one random patient's record" is (0, 1/n)-DP. So delta must
    be much smaller than 1/n to mean anything.

    Raises
    ------
    PrivacyError
        If ``target_delta >= 1 / n_patients``; the message suggests a value.
    """
    _check_delta(target_delta)
    if n_patients < 1:
        raise PrivacyError(f"cannot train on n_patients={n_patients}: the cohort is empty")
    if target_delta >= 1.0 / n_patients:
        raise PrivacyError(
            f"privacy.target_delta={target_delta:g} is not below 1/n = 1/{n_patients} = "
            f"{1.0 / n_patients:.3g}: a mechanism that publishes one random patient's record in "
            f"full is already (0, 1/n)-DP, so delta >= 1/n protects nobody. Set "
            f"privacy.target_delta to at most {suggest_delta(n_patients):g} (well below 1/n)"
        )


def suggest_delta(n_patients: int) -> float:
    """A delta well below ``1/n``: the power of ten at or below ``min(1e-5, 1/(10 n))``."""
    bound = min(1e-5, 0.1 / max(n_patients, 1))
    return 10.0 ** math.floor(math.log10(bound))
