"""Issue 24, item 8: an unwritable output or a busy port is one clear line and exit 2 for
every command that writes files or listens; fedrg runs from any working directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from gdc_fixtures import write_dicom_folder, write_gdc_download
from privacy_ledger_helpers import write_ledger
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import DataConfig

#: Every command that writes files, with its output option pointing at {out}.
WRITERS = {
    "synth": ["synth", "--out", "{out}", "--hospitals", "1", "--patients", "4"],
    "import": ["import", "{gdc}", "--dicom", "{dicom}", "--out", "{out}"],
    "audit --html": ["audit", "{ledger}", "--html", "{out}/audit.html"],
    "certs init": ["certs", "init", "--out", "{out}"],
    "keys new": ["keys", "new", "--out", "{out}", "--name", "h9"],
    "roster make": ["roster", "make", "--hospital", "h1={k1}", "--hospital", "h2={k2}",
                    "--out", "{out}/roster.toml"],
    "site reinit": ["site", "reinit", "--state-dir", "{out}", "--name", "h1", "--reason", "test"],
    "train": ["train", "--cohort", "{gdc}", "--out", "{out}", "--no-dp"],
    "simulate": ["simulate", "--out", "{out}", "--state-dir", "{tmp}/sites",
                 "--set", "data.synthetic_dir={tmp}/cohorts"],
    "server": ["server", "--config", "{server_toml}", "--insecure"],
}
OPTION = {"audit --html": "--html", "site reinit": "--state-dir", "server": "[run] run_dir"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real inputs for every command: a GDC download, a signed ledger, two key folders."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = DataConfig(image_shape=[32, 32])
    values = {"gdc": write_gdc_download(root, cfg), "dicom": write_dicom_folder(root)}
    write_ledger(root / "site", [("run-a", 1, 1.1, 0.05, 30)])
    values["ledger"] = root / "site"
    for k in ("k1", "k2"):
        res = CliRunner().invoke(app, ["keys", "new", "--out", str(root / k), "--name", k])
        assert res.exit_code == 0, res.output
        values[k] = root / k
    return values


def _args(name: str, inputs: dict, tmp_path: Path, out: Path) -> list[str]:
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(f'state_dir = "{tmp_path / "state"}"\n[run]\nrun_dir = "{out}"\n')
    values = {**inputs, "out": out, "tmp": tmp_path, "server_toml": server_toml}
    return [a.format(**{k: str(v) for k, v in values.items()}) for a in WRITERS[name]]


def _one_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output and "[red]" not in res.output
    return lines[0]


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_output_under_a_file_is_one_line_and_exit_2(name, inputs, tmp_path):
    """The output path lies under a file (as root can write anywhere, this is the test's
    unwritable place): one line naming the option, the path and the fix; nothing written."""
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    out = blocker / "out"
    res = CliRunner().invoke(app, _args(name, inputs, tmp_path, out))
    assert res.exit_code == 2, res.output
    line = _one_line(res)
    assert line.startswith("error: ") and str(out) in line, line
    assert OPTION.get(name, "--out") in line
    assert "not a folder" in line or "not writable (Not a directory)" in line
    assert "choose a" in line
    assert blocker.read_text() == "keep"


@pytest.mark.parametrize("name", ["synth", "certs init", "keys new", "site reinit"])
def test_an_output_folder_that_is_a_file_is_one_line_and_exit_2(name, inputs, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep")
    res = CliRunner().invoke(app, _args(name, inputs, tmp_path, out))
    assert res.exit_code == 2, res.output
    line = _one_line(res)
    assert f"{out} is a file, not a folder" in line and "choose another" in line
    assert out.read_text() == "keep"


def test_an_html_report_path_that_is_a_folder_is_refused_before_the_audit(inputs, tmp_path):
    res = CliRunner().invoke(app, ["audit", str(inputs["ledger"]), "--html", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert f"--html {tmp_path} is a folder; give a file path" in _one_line(res)


def test_a_file_system_error_no_command_foresaw_is_one_line(tmp_path):
    """The net under every command (FedrgGroup): a real OSError with a path becomes one line
    naming the path and the fix, exit 2; an OSError about no path stays a traceback."""
    from fedrg.commands.output import FedrgGroup

    blocked = tmp_path / "blocker"
    blocked.write_text("x")
    demo = typer.Typer(cls=FedrgGroup)

    @demo.command("write")
    def write() -> None:
        (blocked / "deep" / "file.txt").parent.mkdir(parents=True)

    @demo.command("other")
    def other() -> None:
        raise OSError("no path here")

    res = CliRunner().invoke(demo, ["write"])
    assert res.exit_code == 2
    line = _one_line(res)
    assert str(blocked) in line and "is a file, not a folder" in line and "choose another" in line
    res = CliRunner().invoke(demo, ["other"])
    assert res.exit_code == 1 and isinstance(res.exception, OSError)


def test_a_busy_server_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "server.toml"
        cfg.write_text(f'state_dir = "state"\n[superlink]\nport = {port}\n[run]\nrun_dir = "run"\n')
        res = CliRunner().invoke(app, ["server", "--config", str(cfg), "--insecure"])
    assert res.exit_code == 2, res.output
    line = _one_line(res)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "[superlink] port" in line
    assert "another program is listening there" in line and "free port" in line
    assert not (tmp_path / "state" / "logs").exists()  # no SuperLink was started


@pytest.mark.slow
def test_simulate_from_a_directory_holding_a_folder_named_fedrg(tmp_path):
    """Run from the folder above a clone named fedrg, after the README's `fedrg synth --out
    data` inside it: Ray puts the working directory first on its workers' sys.path, so every
    simulated hospital imported that folder (ModuleNotFoundError: fedrg.data.cohort)."""
    (tmp_path / "fedrg" / "data" / "hospital-1").mkdir(parents=True)
    (tmp_path / "fedrg" / "fedrg").mkdir()
    cmd = [str(Path(sys.executable).parent / "fedrg"), "simulate", "--rounds", "1",
           "--out", str(tmp_path / "run"), "--state-dir", str(tmp_path / "sites"),
           "--set", f"data.synthetic_dir={tmp_path / 'cohorts'}",
           "--set", "model.public_init=none", "--set", "data.synthetic_patients=32",
           "--set", "data.image_shape=[32, 32]", "--set", "training.local_epochs=0.5",
           "--set", "training.batch_size=8"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=900)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    assert "ModuleNotFoundError" not in logs and "round 1" in proc.stdout
    assert "Warning" not in proc.stdout + proc.stderr  # Ray's start-up notices go to the log
