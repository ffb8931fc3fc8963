"""`fedrg train` and `fedrg predict` end to end on real cohort files (tiny base)."""

from __future__ import annotations

import json
import math

import pytest
from model_fixtures import tiny_base, tiny_cohort
from typer.testing import CliRunner

from fedrg.cli import app


@pytest.mark.slow
def test_train_then_predict(fx_root, tmp_path):
    base = tiny_base(fx_root)
    cohort = tiny_cohort(fx_root)
    out = tmp_path / "run"
    sets = [f"model.base={json.dumps(str(base))}", "model.encoder_width=16",
            "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]",
            "training.train_epochs=2", "training.batch_size=8"]
    args = ["train", "--cohort", str(cohort), "--out", str(out), "--no-dp"]
    for s in sets:
        args += ["--set", s]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == math.ceil(2 * metrics["train_patients"] / 8)
    assert set(metrics["eval"]) >= {"loss", "auroc", "auroc_multimodal", "rouge_l", "findings_f1"}
    assert metrics["payload_bytes"] > 0 and "privacy" not in metrics
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    res = runner.invoke(app, ["predict", "--adapter", str(out), "--cohort", str(cohort)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows) == metrics["cohort_patients"]
    row = rows[0]
    assert set(row) >= {"patient_id", "report", "markers"}
    assert all(0.0 <= v <= 1.0 for v in row["markers"].values())

    res = runner.invoke(app, ["predict", "--adapter", str(out), "--cohort", str(cohort),
                              "--patient", row["patient_id"]])
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 1
    assert json.loads(res.stdout)["report"] == row["report"]


def test_train_reports_a_missing_base(fx_root, tmp_path):
    cohort = tiny_cohort(fx_root)
    res = CliRunner().invoke(app, ["train", "--cohort", str(cohort), "--out", str(tmp_path / "o"),
                                   "--no-dp", "--set", f"model.base={tmp_path / 'missing'}",
                                   "--set", "data.image_shape=[32, 32]"])
    assert res.exit_code == 2
    assert "model.base" in res.output and "does not exist" in res.output


def test_predict_reports_a_missing_adapter(fx_root, tmp_path):
    res = CliRunner().invoke(app, ["predict", "--adapter", str(tmp_path), "--cohort",
                                   str(tiny_cohort(fx_root))])
    assert res.exit_code == 2 and "fedrg_adapter.json" in res.output
