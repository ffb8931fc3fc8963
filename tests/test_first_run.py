"""The first run (issue 24, item 6): progress in every phase with and without a terminal,
no Flower or Ray log line on the console, small cohorts refused before Ray starts, and
every README command accepted (the cheap ones run)."""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
FEDRG = [sys.executable, "-m", "fedrg.cli"]

#: A console line that comes from Flower's or Ray's loggers, or a Python warning.
#: Flower logs as ``DEBUG :`` / ``INFO :`` / ``WARNING :`` (the deprecation notice of
#: ``run_simulation`` among them), Ray's lines name ``ray`` or ``raylet`` in lower case.
FOREIGN_LINE = re.compile(r"\bflwr\b|\bray\b|raylet|\b(DEBUG|INFO|WARNING|ERROR)\s*:|"
                          r"DeprecationWarning|UserWarning|Traceback")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, FEDRG_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    env.pop("FORCE_COLOR", None)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run with stdout and stderr into one pipe (as ``> log 2>&1``: no terminal)."""
    return subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------ no Flower/Ray lines
def test_flower_and_ray_records_never_reach_a_root_console_handler(tmp_path) -> None:
    """Opacus calls ``logging.basicConfig`` on import (a root console handler): when the public
    adapter is pre-trained in the same process, Flower's DEBUG records used to reach it."""
    import opacus.utils.module_utils  # noqa: F401  (the import that adds the root handler)

    from fedrg.flower.simulation import FlowerLogToFile

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    flwr_log, ray_log = logging.getLogger("flwr"), logging.getLogger("ray")
    # an in-process simulation earlier in the session leaves Ray's logger at ERROR
    # (ray.init(logging_level=ERROR)): set both levels so the test does not depend on order
    levels = flwr_log.level, ray_log.level
    flwr_log.setLevel(logging.DEBUG)
    ray_log.setLevel(logging.DEBUG)
    try:
        with FlowerLogToFile(tmp_path / "logs" / "flower.log"):
            flwr_log.debug("a Flower DEBUG record")
            flwr_log.warning("a Flower deprecation notice")
            ray_log.warning("a Ray record")
        assert stream.getvalue() == ""
        assert "a Flower deprecation notice" in (tmp_path / "logs" / "flower.log").read_text()
        assert "a Ray record" in (tmp_path / "logs" / "flower.log").read_text()
        logging.getLogger("flwr").warning("after the simulation")  # propagation restored
        assert "after the simulation" in stream.getvalue()
    finally:
        root.removeHandler(handler)
        flwr_log.setLevel(levels[0])
        ray_log.setLevel(levels[1])


# ------------------------------------------------------------------ progress without a terminal
def test_phase_reports_steps_without_a_terminal() -> None:
    from fedrg.commands.progress import RoundProgress, phase

    buf = io.StringIO()
    console = Console(file=buf, width=120)  # not a terminal
    with phase(console, "preparing the public initial adapter") as step:
        step("stage 1 of 2: epoch 1 of 20")
    with RoundProgress(console, rounds=3) as progress:
        progress.on_phase("train", 1, 3)
    text = buf.getvalue()
    assert "preparing the public initial adapter ..." in text
    assert re.search(r"stage 1 of 2: epoch 1 of 20 \(\d+s\)", text)
    assert "starting the simulation engine (Ray) ..." in text
    assert "round 1/3: local training at 3 hospital(s) ..." in text


def test_public_adapter_build_reports_each_step(base_dir, tmp_path) -> None:
    from model_fixtures import tiny_data_cfg, tiny_model_cfg

    from fedrg.config import TrainingConfig
    from fedrg.train.public_init import PublicInitRecipe, ensure_public_init

    recipe = PublicInitRecipe(hospitals=2, patients=16, encoder_epochs=3, full_epochs=0.5,
                              batch_size=16)
    said: list[str] = []
    ensure_public_init(tiny_model_cfg(base_dir, public_init="synthetic"), tiny_data_cfg(),
                       TrainingConfig(), recipe=recipe, root=tmp_path, progress=said.append)
    assert said[0].startswith("synthesising 2 public cohorts")
    assert any(s.startswith("stage 1 of 2") for s in said)
    assert any(s.startswith("stage 2 of 2") for s in said)


# ------------------------------------------------------------------ small cohorts refused up front
def test_small_cohorts_are_refused_before_ray_once_with_the_fix(tmp_path) -> None:
    """``fedrg synth --patients 60`` cohorts: the default batch (32) is above the hospitals'
    ``max_sample_rate`` of their ~45 training patients. Refused once, before Ray, with the fix."""
    env = _env(tmp_path)
    made = _run([*FEDRG, "synth", "--out", "data", "--hospitals", "3", "--patients", "60",
                 "--seed", "0"], tmp_path, env)
    assert made.returncode == 0, made.stdout
    cohorts = [a for i in range(1, 4) for a in ("--cohort", f"data/hospital-{i}")]
    res = _run([*FEDRG, "simulate", *cohorts, "--out", "run", "--state-dir", "sites"], tmp_path, env)
    out = res.stdout
    assert res.returncode == 2, out
    assert out.count("is outside the allowed range") == 1, out  # once, naming all three
    assert "hospital-1, hospital-2, hospital-3" in out
    fix = re.search(r"--set training\.batch_size=(\d+)", out)
    assert fix and "fedrg synth --patients" in out, out
    assert "starting the simulation engine" not in out
    assert not (tmp_path / "run" / "logs").exists()  # Ray and Flower never started
    assert not FOREIGN_LINE.search(out), out

    # the fix it names is accepted by the same hospitals' own plan
    from fedrg.commands.federation import check_sites_would_train, simulated_policy, simulated_sites
    from fedrg.config import build_config

    batch = int(fix.group(1))
    cfg = build_config({"training": {"batch_size": batch}})
    policy = simulated_policy(None)
    sites = simulated_sites([tmp_path / "data" / f"hospital-{i}" for i in range(1, 4)],
                            tmp_path / "sites", policy)
    check_sites_would_train(cfg, sites, policy)  # raises if any hospital would refuse
    with pytest.raises(Exception, match="training.batch_size"):
        check_sites_would_train(build_config({"training": {"batch_size": batch + 1}}), sites, policy)


# ------------------------------------------------------------------ README commands
def readme_commands() -> list[str]:
    """The shell commands of README.md's ```bash blocks (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def _parses(command: str) -> None:
    """The fedrg CLI accepts this command line's subcommand and options (click's parser)."""
    import typer

    from fedrg.cli import app

    group = typer.main.get_command(app)
    argv = shlex.split(command)[1:]
    ctx = group.make_context("fedrg", list(argv), resilient_parsing=True)
    name, sub, rest = group.resolve_command(ctx, ctx.protected_args + ctx.args)
    assert sub is not None, command
    while hasattr(sub, "resolve_command") and rest:  # nested groups (roster make, site reinit)
        sub_ctx = sub.make_context(name, list(rest), parent=ctx, resilient_parsing=True)
        name, sub, rest = sub.resolve_command(sub_ctx, sub_ctx.protected_args + sub_ctx.args)
    sub.make_context(name, list(rest), parent=ctx)  # unknown options, missing values: errors


def test_readme_lists_the_commands_this_test_knows() -> None:
    commands = readme_commands()
    assert "make demo" in commands and "fedrg simulate" in commands
    assert any(c.startswith("fedrg synth ") for c in commands)
    # the parse check refuses what the CLI refuses (so a README typo fails the test)
    for wrong in ("fedrg simulate --bogus 1", "fedrg roster make --nope x", "fedrg nosuch",
                  "fedrg site reinit --state-dir"):
        with pytest.raises((Exception, SystemExit)):
            _parses(wrong)


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("fedrg ")])
def test_every_readme_fedrg_command_parses(command: str) -> None:
    _parses(command)


def test_readme_make_targets_exist() -> None:
    for command in readme_commands():
        if command.startswith("make "):
            res = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT,
                                 capture_output=True, text=True, check=False)
            assert res.returncode == 0, (command, res.stderr)


#: README commands run as they are (cheap); the rest are parsed (above) or run in slow tests.
CHEAP = ("fedrg synth ", "fedrg validate ", "fedrg roster show", "fedrg --help")


def test_cheap_readme_commands_run_verbatim(tmp_path) -> None:
    env = _env(tmp_path)
    ran = 0
    for command in readme_commands():
        if not command.startswith(("fedrg synth ", "fedrg validate ")):
            continue
        res = _run([*FEDRG, *shlex.split(command)[1:]], tmp_path, env)
        assert res.returncode == 0, (command, res.stdout)
        assert not FOREIGN_LINE.search(res.stdout), (command, res.stdout)
        ran += 1
    assert ran >= 3
    assert (tmp_path / "data" / "hospital-3" / "manifest.csv").is_file()
    assert (tmp_path / "shifted" / "hospital-1" / "manifest.csv").is_file()


@pytest.mark.slow
def test_readme_train_and_predict_run_verbatim(tmp_path) -> None:
    """``fedrg train`` and ``fedrg predict`` as the README writes them (``<ID>``: a patient of
    the cohort), after the README's own ``fedrg synth``."""
    import csv

    env = _env(tmp_path)
    commands = readme_commands()
    synth = next(c for c in commands if c.startswith("fedrg synth --out data "))
    train = next(c for c in commands if c.startswith("fedrg train "))
    predict = next(c for c in commands if c.startswith("fedrg predict "))
    for command in (synth, train):
        res = _run([*FEDRG, *shlex.split(command)[1:]], tmp_path, env)
        assert res.returncode == 0, (command, res.stdout)
        assert not FOREIGN_LINE.search(res.stdout), (command, res.stdout)
    with open(tmp_path / "data" / "hospital-1" / "manifest.csv", newline="") as f:
        patient = next(csv.DictReader(f))["patient_id"]
    res = _run([*FEDRG, *shlex.split(predict.replace("<ID>", patient))[1:]], tmp_path, env)
    assert res.returncode == 0, (predict, res.stdout)


# ------------------------------------------------------------------ the cold path
@pytest.mark.slow
def test_cold_simulate_prints_progress_and_no_flower_or_ray_line(tmp_path) -> None:
    """``fedrg simulate`` on an empty FEDRG_CACHE (cohorts and base model built in this process,
    the shipped public adapter installed after its hash check), output to a pipe: every phase
    says so, no foreign log line. (Building the public adapter's progress:
    test_public_adapter_build_reports_each_step.)"""
    env = _env(tmp_path)
    res = _run([*FEDRG, "simulate", "--rounds", "1", "--out", "run", "--state-dir", "sites"],
               tmp_path, env, timeout=1200)
    out = res.stdout
    assert res.returncode == 0, out
    for expected in ("preparing the synthetic hospital cohorts", "preparing the base model",
                     "preparing the public initial adapter",
                     "installing the shipped public adapter", "checking each hospital's cohort",
                     "starting the simulation engine (Ray)", "round 1/1: local training",
                     "done in"):
        assert expected in out, (expected, out)
    bad = [line for line in out.splitlines() if FOREIGN_LINE.search(line)]
    assert not bad, out


def test_a_hospital_that_will_decline_is_named_with_its_reason_as_plain_text(tmp_path, capsys) -> None:
    """Enough hospitals accept, one declines: the note names it with the whole reason (which
    holds "[policy]", once eaten as rich markup: "the site's ;")."""
    from fedrg.commands.federation import check_sites_would_train, simulated_policy, simulated_sites
    from fedrg.config import build_config
    from fedrg.data.synth import synthesize

    big = synthesize(tmp_path / "big", hospitals=3, patients=60, seed=0)
    (small,) = synthesize(tmp_path / "small", hospitals=1, patients=16, seed=1)
    small = small.rename(tmp_path / "big" / "hospital-4")  # site names come from folder names
    policy = simulated_policy(None)
    sites = simulated_sites([*big, small], tmp_path / "sites", policy)
    small_name = sites[-1].name
    check_sites_would_train(build_config({"training": {"batch_size": 16}}), sites, policy)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"note: {small_name} will decline:" in out, out
    assert "the site's [policy]" in out, out
    assert "--set training.batch_size=" in out, out
