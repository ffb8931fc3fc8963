"""The hospital's ClientApp launcher: Flower's ``flwr-clientapp``, verifying the bundle first.

Flower's SuperExec starts one ``flwr-clientapp`` process per task, by name from ``PATH``.
``fedrg client`` puts a private directory first on its SuperNode's ``PATH`` holding a
``flwr-clientapp`` that runs this module (:func:`write_launcher`; through the hospital's
ClientApp fork server, :mod:`fedrg.deploy.clientapp_forkserver`, when it runs, so Python and
Flower are not started and imported again for every message). It runs Flower's own
``flwr-clientapp`` with one change: before Flower installs the server's app bundle (FAB),
the bundle is checked against the hospital's pin (:func:`fedrg.deploy.pinning.check_fab`).
A bundle that is not the approved app is refused before any file of it is written or
imported; Flower then answers the server with an error, and the refusal is appended to
``<state_dir>/logs/app-refusals.log``, which ``fedrg client`` prints.

**Pinned Flower code.** Flower has no public hook before it installs a bundle, so this module
replaces ``install_from_fab`` in Flower's ClientApp runtime module, which calls it by that
name. A Flower that installed bundles some other way would skip the check without a sound,
so the patch is made only on the reviewed Flower code (:data:`FLOWER_SOURCES`); any other
Flower makes every ClientApp fail with :class:`~fedrg.library_pins.LibraryChangedError`
before it contacts the SuperNode.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedrg.deploy.pinning import PIN_FILE, AppNotApprovedError, AppPin, check_fab
from fedrg.files import PRIVATE_MODE, atomic_write
from fedrg.library_pins import require_unchanged
from fedrg.runtime import apply_offline_env

REFUSALS_LOG = "app-refusals.log"
LAUNCHER_NAME = "flwr-clientapp"
FLOWER_SOURCES = {  # flwr 1.42.0, as reviewed for this module
    # flwr-clientapp's entry point runs run_clientapp in this process ...
    "flwr.supernode.cli.flwr_clientapp":
        "9e02b412fb895b05a772a3b7d27af623d88819c21159264da48a9dd8117c1da0",
    # ... which installs the bundle with its module-global install_from_fab, then loads it
    "flwr.supernode.runtime.run_clientapp":
        "fa6612aaeda9cd398de69199b0cf264a38f72c1b9cfdc53644c8d6dab0b70eb6",
    # the function wrapped (verifying_installer keeps its signature)
    "flwr.cli.install.install_from_fab":
        "481bd04cde5823220658a8a3e84e827a5ef38254223972e4e14c4cb3968e917e",
}
"""``name -> SHA-256 of its source`` for the Flower code the bundle check is patched into."""
_reviewed = {"ok": False}  # checked once per process (the fork server checks before forking)


def require_reviewed_flower() -> None:
    """Raise :class:`~fedrg.library_pins.LibraryChangedError` unless Flower's ClientApp
    runtime is the reviewed code (:data:`FLOWER_SOURCES`)."""
    if _reviewed["ok"]:
        return
    import flwr.cli.install
    import flwr.supernode.cli.flwr_clientapp
    import flwr.supernode.runtime.run_clientapp

    require_unchanged("flwr", FLOWER_SOURCES, {
        "flwr.supernode.cli.flwr_clientapp": flwr.supernode.cli.flwr_clientapp,
        "flwr.supernode.runtime.run_clientapp": flwr.supernode.runtime.run_clientapp,
        "flwr.cli.install.install_from_fab": flwr.cli.install.install_from_fab,
    }, module="fedrg.deploy.pinned_clientapp")
    _reviewed["ok"] = True


def write_launcher(state_dir: str | Path, pin: AppPin) -> Path:
    """Write the pin and the ``flwr-clientapp`` launcher into ``state_dir``.

    Returns
    -------
    Path
        The directory to put first on the SuperNode's ``PATH`` (``<state_dir>/bin``).
    """
    state = Path(state_dir)
    pin_path = state / PIN_FILE
    atomic_write(pin_path, pin.to_json(), mode=PRIVATE_MODE)
    bin_dir = state / "bin"
    launcher = bin_dir / LAUNCHER_NAME
    from fedrg.hospital.clientapp_launch import LAUNCHER_SCRIPT

    python = shlex.quote(sys.executable)
    # stdlib and fedrg.hospital.local_socket only (-I -S): the fork server's child runs main()
    # below; without a fork server the launch script execs `python -m
    # fedrg.deploy.pinned_clientapp` instead. It finds the fork server's socket from the state
    # dir at each launch and hands nothing to a listener that fails the checks
    atomic_write(launcher,
                 "#!/bin/sh\n"
                 "# written by fedrg client: Flower's flwr-clientapp, refusing unapproved app bundles\n"
                 f"exec {python} -I -S {shlex.quote(str(LAUNCHER_SCRIPT))} "
                 f"{shlex.quote(str(state.resolve()))} "
                 f"{python} -- \"$@\"\n", mode=0o700)
    return bin_dir


def _split(argv: Sequence[str]) -> tuple[Path, list[str]]:
    rest, state = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--fedrg-state-dir":
            state = next(it, None)
        else:
            rest.append(arg)
    if not state:
        raise SystemExit("pinned_clientapp: --fedrg-state-dir DIR is required")
    return Path(state), rest


def verifying_installer(
    install: Callable[..., Path], pin: AppPin, state_dir: Path
) -> Callable[..., Path]:
    """Wrap Flower's ``install_from_fab`` so the bundle is checked before it is installed.

    Parameters
    ----------
    install : callable
        Flower's ``install_from_fab(fab_file, install_dir=None, skip_prompt=False)``.
    pin : AppPin
        What the hospital approved.
    state_dir : Path
        The hospital's state directory (refusals go to ``logs/app-refusals.log``).

    Returns
    -------
    callable
        Same signature as ``install``; raises :class:`AppNotApprovedError` (and never calls
        ``install``) for a bundle that is not the approved app.
    """

    def install_verified(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            check_fab(content, pin)
        except AppNotApprovedError as err:
            log_dir = state_dir / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / REFUSALS_LOG, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {err}\n")
            print(f"fedrg: {err}", file=sys.stderr, flush=True)
            raise
        return install(fab_file, *args, **kwargs)

    return install_verified


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - a process
    """Run Flower's ``flwr-clientapp`` with the bundle check in front of the install."""
    import flwr.supernode.runtime.run_clientapp as runner
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    state_dir, rest = _split(sys.argv[1:] if argv is None else argv)
    pin = AppPin.from_json((state_dir / PIN_FILE).read_text())
    require_reviewed_flower()  # else the check below might never be called
    runner.install_from_fab = verifying_installer(runner.install_from_fab, pin, state_dir)
    sys.argv = [LAUNCHER_NAME, *rest]
    apply_offline_env()  # fedrg owns this process (fedrg.runtime)
    flwr_clientapp()


if __name__ == "__main__":  # pragma: no cover
    main()
