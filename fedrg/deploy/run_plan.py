"""What ``fedrg server`` decides before it starts anything: the run's directory and quorum.

* :func:`check_run_dir`: every run writes to a directory of its own. An existing non-empty
  ``[run] run_dir`` is refused unless the run is resumed (``--resume``), so an earlier run's
  metrics, checkpoint and adapter are never overwritten and never printed as this run's.
* :func:`hospitals_needed`: the fewest hospitals the run has to wait for. A hospital's own
  policy refuses any secure sum with fewer than ``min_secagg_peers`` other hospitals in it,
  so a run that starts with fewer would only collect refusals. The server cannot read a
  hospital's policy: each ``[[auth.hospitals]]`` table states the ``min_secagg_peers`` that
  hospital published (default: the policy default). The hospital still decides for itself.

Both raise :class:`~fedrg.errors.FedrgError` naming the setting, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedrg.errors import FedrgError
from fedrg.policy import secure_sum_size

if TYPE_CHECKING:
    from fedrg.config import ExperimentConfig
    from fedrg.deploy.settings import ServerSettings


def check_run_dir(run_dir: Path, *, config: Path, resume: bool) -> None:
    """Refuse to start a new run in a directory that already holds something.

    Parameters
    ----------
    run_dir
        ``[run] run_dir`` (absolute).
    config
        The server TOML (named in the message).
    resume
        ``--resume``: the directory must then hold the run to continue (checked elsewhere).

    Raises
    ------
    FedrgError
        ``run_dir`` is a file, or a non-empty directory and ``resume`` is false.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise FedrgError(f"[run] run_dir = {run_dir} in {config} is a file, not a directory; "
                         "set run_dir to a new directory")
    if resume or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    raise FedrgError(
        f"[run] run_dir = {run_dir} in {config} already holds a run (nothing was changed); "
        f"continue it with: fedrg server --config {config} --resume, or set [run] run_dir "
        "to a new directory (or move the old one away)")


@dataclass(frozen=True)
class Quorum:
    """How many hospitals a run waits for, and why."""

    needed: int
    requested: int
    reason: str  # empty when the request already covered the hospitals' policies

    @property
    def raised(self) -> bool:
        """True when ``federation.min_hospitals`` was below what the hospitals' policies need."""
        return self.needed > self.requested


def hospitals_needed(s: ServerSettings, cfg: ExperimentConfig, *, config: Path,
                     insecure: bool) -> Quorum:
    """The hospitals a run must wait for: ``federation.min_hospitals``, raised to the
    largest secure sum any allowed hospital's published policy requires.

    Raises
    ------
    FedrgError
        When the allowed hospitals (``[[auth.hospitals]]``) are fewer than that, or than
        ``federation.min_hospitals``: the run could never start.
    """
    requested = cfg.federation.min_hospitals
    needed, reason = requested, ""
    if cfg.secagg.enabled and s.auth.hospitals:
        strictest = max(s.auth.hospitals, key=lambda h: h.min_secagg_peers)
        size = secure_sum_size(min_secagg_peers=strictest.min_secagg_peers)
        if size > needed:
            needed = size
            reason = (f"{strictest.name}'s policy (min_secagg_peers = "
                      f"{strictest.min_secagg_peers} in [[auth.hospitals]] of {config}) refuses "
                      f"any secure sum of fewer than {needed} hospitals")
    allowed = len(s.auth.hospitals)
    if not insecure and needed > allowed:
        why = reason or f"federation.min_hospitals = {requested}"
        raise FedrgError(
            f"the run needs {needed} hospitals ({why}) but [[auth.hospitals]] in {config} "
            f"allows only {allowed}; add the missing hospitals' node keys, or lower "
            "federation.min_hospitals in [run] overrides")
    if needed > cfg.federation.hospitals:
        raise FedrgError(
            f"the run needs {needed} hospitals ({reason}) but federation.hospitals = "
            f"{cfg.federation.hospitals}; set federation.hospitals to at least {needed} in "
            f"[run] overrides of {config}")
    return Quorum(needed=needed, requested=requested, reason=reason)
