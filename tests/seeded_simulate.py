"""`fedrg simulate` (same arguments, same CLI) with seeded DP noise in every Ray worker.

Tests only. The hospitals of a simulation train in Ray worker processes, on whichever node
and worker is free, so the thread-local switch of ``use_seeded_noise_for_tests`` in the
driver cannot reach them, and a per-process sequence would not repeat. This driver sets the
simulation's Ray ``worker_process_setup_hook`` to :func:`worker_setup`, which imports fedrg
first (as the normal hook does) and then selects keyed seeded noise in that worker
(``seed_noise_by_key_for_tests``): each hospital's noise in a round comes from
(:data:`SEED`, hospital, round), whichever process or node trains it. Nothing changes in
what the command does otherwise. Run as ``python tests/seeded_simulate.py simulate ...``;
the workers import this module through the driver's ``sys.path`` (fedrg passes it to the
job as ``PYTHONPATH``).
"""

from __future__ import annotations

SEED = 25


def worker_setup() -> None:
    """Ray worker start-up hook: fedrg's own, then keyed seeded noise (tests only)."""
    from fedrg.flower import simulation
    from fedrg.privacy.dpsgd import seed_noise_by_key_for_tests

    simulation.import_fedrg_first()
    seed_noise_by_key_for_tests(SEED)


if __name__ == "__main__":
    from fedrg.flower import simulation

    simulation.WORKER_SETUP_HOOK = "seeded_simulate.worker_setup"
    from fedrg.cli import main

    main()
