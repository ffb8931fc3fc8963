"""Does the real model learn? The built-in base, default settings, synthetic cohorts on disk.

Slow (minutes): runs in CI. The thresholds sit well below the measured values (see
docs/model.md and docs/federation.md) so that they catch a broken learner, not noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedrg.cli import app

pytestmark = pytest.mark.slow


def test_fedrg_train_learns_markers_from_the_image_and_report_findings(tmp_path):
    from fedrg.data.synth import synthesize

    (cohort,) = synthesize(tmp_path / "cohorts", hospitals=1, patients=300, seed=5)
    out = tmp_path / "train"
    res = CliRunner().invoke(app, ["train", "--cohort", str(cohort), "--out", str(out),
                                   "--no-dp", "--eval-before"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["untrained"], metrics["eval"]
    print(f"\nimage-only IDH AUROC {before['auroc']['idh_mutant']:.3f} -> "
          f"{after['auroc']['idh_mutant']:.3f}; findings F1 {before['findings_f1']:.3f} -> "
          f"{after['findings_f1']:.3f} ({metrics['val_patients']} held-out patients)")
    assert after["auroc"]["idh_mutant"] > 0.75
    assert after["auroc_multimodal"]["idh_mutant"] > 0.9  # the IDH1 call is in the genomics
    assert after["findings_f1"] > before["findings_f1"] + 0.1


def test_default_simulation_improves_idh_auroc_over_rounds(tmp_path):
    """The main job with its defaults (3 hospitals, 3 rounds, DP-SGD at epsilon 8, secure
    aggregation): the image-only IDH AUROC of the global model goes up."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrg.cli", "simulate", "--out", str(run),
         "--state-dir", str(tmp_path / "sites"),
         "--set", f"data.synthetic_dir={tmp_path / 'cohorts'}"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    idh = [r["auroc"]["idh_mutant"] for r in json.loads((run / "metrics.json").read_text())["rounds"]]
    print(f"\nIDH AUROC by round: {idh}")
    assert len(idh) == 3
    assert idh[-1] > idh[0] and idh[-1] > 0.6
