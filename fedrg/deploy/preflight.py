"""Checks before a deployment starts anything: the app and its run config, the server's TLS
files and allowed hospitals, a hospital's cohort, CA certificate, node key and approved app.

Each raises :class:`~fedrg.errors.FedrgError` naming the file or setting and the fix; the
commands in :mod:`fedrg.commands.deploy` only print the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedrg.errors import FedrgError

if TYPE_CHECKING:
    from fedrg.deploy.pinning import AppPin
    from fedrg.deploy.settings import HospitalSettings, ServerSettings

__all__ = ["approved_app", "check_app_run_config", "check_server_files", "default_app_dir",
           "prepare_client"]


def default_app_dir() -> Path:
    """fedrg's Flower app directory (the source tree holding ``pyproject.toml`` and ``clients/``)."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "clients").is_dir():
        raise FedrgError(
            f"cannot find fedrg's Flower app next to {root}; set run.app_dir in the server "
            "config to the fedrg source directory (the one holding pyproject.toml)"
        )
    return root


def check_app_run_config(app_dir: Path, run_config: Mapping[str, object]) -> None:
    """Refuse a run whose config keys the app's ``pyproject.toml`` does not declare.

    Flower's deployment engine rejects undeclared run-config keys with only "Invalid run
    configuration"; this names the keys and the fix instead.
    """
    import tomllib

    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FedrgError(f"{app_dir} holds no pyproject.toml; set run.app_dir to fedrg's app")
    declared: set[str] = set()

    def walk(prefix: str, table: dict) -> None:
        for key, value in table.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            else:
                declared.add(name)

    app_cfg = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    walk("", app_cfg.get("config", {}))
    missing = sorted(set(run_config) - declared)
    if missing:
        raise FedrgError(
            f"{pyproject} does not declare the run-config key(s) {', '.join(missing)}, which "
            "Flower would refuse; run `python tools/sync_run_config.py` in the fedrg source "
            "directory (or install a fedrg release whose app matches its config)"
        )


def check_server_files(s: ServerSettings, insecure: bool) -> None:
    """Every check ``fedrg server`` makes on its TLS files and allowed hospitals (none with ``insecure``)."""
    from fedrg.deploy.certs import check_server_certificate
    from fedrg.deploy.files import check_private_mode
    from fedrg.deploy.keys import fingerprint, load_node_public_key

    if insecure:
        return
    missing = [p for p in (s.tls.ca_cert, s.tls.server_cert, s.tls.server_key) if not Path(p).is_file()]
    if missing:
        raise FedrgError(
            f"refusing to start without TLS: {', '.join(missing)} not found. Create the files "
            "with `fedrg certs init --out DIR --host <server name>` and point [tls] at them "
            "(or pass --insecure on a closed test machine only)"
        )
    # the operator's `flwr` CLI connects through 127.0.0.1; hospitals through the public
    # host when it is a specific address (for 0.0.0.0 the names come from `certs init --host`)
    check_server_certificate(s.tls.server_cert, s.tls.server_key, s.tls.ca_cert,
                             host="127.0.0.1")
    if s.superlink.host not in ("", "0.0.0.0", "::", "127.0.0.1"):
        check_server_certificate(s.tls.server_cert, s.tls.server_key, s.tls.ca_cert,
                                 host=s.superlink.host)
    check_private_mode(s.tls.server_key)
    if not s.auth.hospitals:
        raise FedrgError(
            "no hospitals are allowed to join: add one [[auth.hospitals]] table (name, "
            "public_key = the hospital's node_auth.pub) per hospital to the server config"
        )
    seen: dict[str, str] = {}
    for h in s.auth.hospitals:
        fp = fingerprint(load_node_public_key(h.public_key))
        if fp in seen:
            raise FedrgError(
                f"hospitals {seen[fp]} and {h.name} have the same public key ({h.public_key}); "
                "every hospital needs its own key from `fedrg keys new`"
            )
        seen[fp] = h.name


def prepare_client(settings: HospitalSettings, *, insecure: bool = False) -> None:
    """Every check ``fedrg client`` makes before starting anything.

    Validates the cohort against the federation's data settings, the CA certificate
    (parsed, a CA, within its validity dates) and the node key (OpenSSH EC, mode 0600).

    Raises
    ------
    FedrgError
        ``CohortError`` listing every cohort problem, or ``DeployError`` naming the file.
    """
    from fedrg.config import load_config
    from fedrg.data.cohort import load_cohort
    from fedrg.deploy.certs import check_ca_certificate
    from fedrg.deploy.keys import load_node_private_key

    data_cfg = load_config(settings.experiment or None).data
    load_cohort(settings.site.cohort, data_cfg)
    if not insecure:
        check_ca_certificate(settings.server.root_certificates)
        load_node_private_key(settings.auth.private_key)


def approved_app(settings: HospitalSettings) -> AppPin:
    """The app this hospital runs: its installed fedrg's app files and version.

    Raises
    ------
    FedrgError
        ``[app] digest`` is set and is not the installed app's digest (every bundle would
        be refused).
    """
    from fedrg.deploy.pinning import installed_pin, pin_digest

    pin = installed_pin(digest=settings.app.digest)
    own = pin_digest(pin)
    if settings.app.digest and settings.app.digest != own:
        raise FedrgError(
            f"[app] digest = {settings.app.digest} is not the digest of this hospital's "
            f"installed fedrg {pin.version} app ({own}); install the release you reviewed, "
            "or set [app] digest to the digest of the installed one")
    return pin
