"""Code pinning: the hospital's check of the server's app bundle (FAB), on real FABs built by
Flower's own builder from fedrg's app, and the launcher that runs the check before Flower
installs anything. Fast: no processes, no network.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from typer.testing import CliRunner

from fedrg import __version__
from fedrg.deploy.pinned_clientapp import REFUSALS_LOG, verifying_installer, write_launcher
from fedrg.deploy.pinning import (
    AppNotApprovedError,
    AppPin,
    check_fab,
    installed_app_files,
    installed_pin,
    pin_digest,
)
from fedrg.deploy.processes import stage_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """fedrg's own Flower app, staged exactly as `fedrg server` stages it before `flwr run`."""
    return stage_app(ROOT, tmp_path_factory.mktemp("app") / "app")


def _fab(app: Path) -> bytes:
    return build_fab_from_disk(app)


def _copy(staged: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "app"
    shutil.copytree(staged, dst)
    return dst


def test_installed_app_files_are_the_bundled_entry_points():
    files = installed_app_files()
    assert {"clients/app.py", "server/app.py"} <= set(files)
    assert all(p.split("/")[0] in ("clients", "server") and p.endswith(".py") for p in files)
    assert all(len(h) == 64 for h in files.values())


def test_unmodified_bundle_is_accepted_and_digest_matches_installed(staged):
    pin = installed_pin()
    digest = check_fab(_fab(staged), pin)
    assert digest == pin_digest(pin)
    assert pin.version == __version__


def test_modified_client_app_is_refused_naming_the_file(staged, tmp_path):
    app = _copy(staged, tmp_path)
    (app / "clients" / "app.py").write_text(
        (app / "clients" / "app.py").read_text() + "\nimport shutil  # copy the cohort out\n")
    with pytest.raises(AppNotApprovedError) as err:
        check_fab(_fab(app), installed_pin())
    msg = str(err.value)
    assert "clients/app.py differs" in msg and "server/app.py" not in msg
    assert "Nothing from it ran" in msg


def test_added_and_missing_files_are_refused(staged, tmp_path):
    app = _copy(staged, tmp_path)
    (app / "clients" / "exfiltrate.py").write_text("print('x')\n")
    (app / "server" / "app.py").unlink()
    with pytest.raises(AppNotApprovedError) as err:
        check_fab(_fab(app), installed_pin())
    msg = str(err.value)
    assert "clients/exfiltrate.py is not part of the approved app" in msg
    assert "server/app.py of the approved app is missing" in msg


def test_other_fedrg_version_is_refused_with_both_versions(staged, tmp_path):
    app = _copy(staged, tmp_path)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    assert f'version = "{__version__}"' in text
    pyproject.write_text(text.replace(f'version = "{__version__}"', 'version = "9.9.9"', 1))
    with pytest.raises(AppNotApprovedError) as err:
        check_fab(_fab(app), installed_pin())
    msg = str(err.value)
    assert "fedrg 9.9.9" in msg and f"fedrg {__version__}" in msg
    assert "same fedrg version" in msg


def test_other_clientapp_component_is_refused(staged, tmp_path):
    app = _copy(staged, tmp_path)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(
        'clientapp = "clients.app:app"', 'clientapp = "fedrg.flower.apps:evil"'))
    with pytest.raises(AppNotApprovedError, match="ClientApp is 'fedrg.flower.apps:evil'"):
        check_fab(_fab(app), installed_pin())


def test_digest_pin_refuses_a_bundle_that_matches_files_but_not_the_pin(staged):
    pin = installed_pin(digest="ab" * 32)
    with pytest.raises(AppNotApprovedError, match="pinned \\[app\\] digest"):
        check_fab(_fab(staged), pin)
    good = installed_pin()
    assert check_fab(_fab(staged), installed_pin(digest=pin_digest(good))) == pin_digest(good)


def test_not_a_zip_and_unsafe_paths_are_refused():
    with pytest.raises(AppNotApprovedError, match="not a valid FAB"):
        check_fab(b"not a zip", installed_pin())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../clients/app.py", "x")
        zf.writestr("pyproject.toml", "")
    with pytest.raises(AppNotApprovedError, match="unsafe path"):
        check_fab(buf.getvalue(), installed_pin())


def test_pin_json_round_trip():
    pin = installed_pin(digest="cd" * 32)
    assert AppPin.from_json(pin.to_json()) == pin


def test_verifying_installer_never_installs_a_refused_bundle(staged, tmp_path):
    app = _copy(staged, tmp_path)
    (app / "clients" / "app.py").write_text("raise SystemExit('hostile')\n")
    installed: list[bytes] = []

    def install(fab_file, *args, **kwargs):  # stands for Flower's install_from_fab
        installed.append(fab_file)
        return tmp_path / "installed"

    state = tmp_path / "state"
    guarded = verifying_installer(install, installed_pin(), state)
    with pytest.raises(AppNotApprovedError):
        guarded(_fab(app), skip_prompt=True)
    assert installed == []
    refusals = (state / "logs" / REFUSALS_LOG).read_text()
    assert "clients/app.py differs" in refusals
    good = _fab(staged)
    assert guarded(good, skip_prompt=True) == tmp_path / "installed"
    assert installed == [good]


def test_launcher_runs_the_pinned_clientapp_module(tmp_path):
    bin_dir = write_launcher(tmp_path, installed_pin())
    launcher = bin_dir / "flwr-clientapp"
    text = launcher.read_text()
    # through the fork server (fedrg.hospital.clientapp_launch), which runs
    # pinned_clientapp.main, or `python -m fedrg.deploy.pinned_clientapp` without one
    assert "clientapp_launch.py" in text and str(tmp_path.resolve()) in text
    assert os.access(launcher, os.X_OK)
    assert stat.S_IMODE((tmp_path / "app-pin.json").stat().st_mode) == 0o600
    assert AppPin.from_json((tmp_path / "app-pin.json").read_text()) == installed_pin()


def test_fedrg_version_flag():
    from fedrg.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"fedrg {__version__}"


def test_pyproject_version_is_fedrg_version():
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["version"] == __version__
