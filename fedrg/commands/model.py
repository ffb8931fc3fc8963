"""``fedrg train``, ``fedrg predict`` and ``fedrg model-hash``: one cohort, one adapter, one base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from fedrg.errors import FedrgError


def _fail(err: FedrgError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)


def _progress(text: str) -> None:
    """One progress line on stderr (stdout carries the JSON result)."""
    typer.echo(f"fedrg train: {text}", err=True)


class StepProgress:
    """Training steps on stderr: a rich bar on a terminal, else a line at every tenth."""

    def __init__(self, text: str, total: int) -> None:
        from rich.console import Console

        self.text, self.total = text, max(int(total), 1)
        self.console = Console(stderr=True)
        self.bar: Any = None
        self.next_line = 0.1

    def __enter__(self) -> StepProgress:
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(f"fedrg train: {self.text}", BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.task = self.bar.add_task("train", total=self.total)
            self.bar.start()
        else:
            _progress(self.text)
        return self

    def update(self, done: int, total: int) -> None:
        """``on_step`` callback of :func:`fedrg.train.loop.train_local`."""
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif done >= self.next_line * self.total and done < self.total:
            _progress(f"step {done}/{self.total}")
            while self.next_line * self.total <= done:
                self.next_line += 0.1

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


#: Where ``fedrg train --out OUT`` puts the adapter, as ``fedrg simulate`` does in its run
#: directory: ``OUT/adapter`` (``OUT/metrics.json`` beside it).
ADAPTER_DIR = "adapter"


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder ``--adapter`` names: the folder itself, or the ``adapter/`` folder
    inside a ``fedrg train --out`` or ``fedrg simulate`` output folder.

    Raises
    ------
    ModelError
        When neither holds an adapter; the message names both places and the fix.
    """
    from fedrg.errors import ModelError
    from fedrg.model.io import META_FILE

    p = Path(path)
    for candidate in (p, p / ADAPTER_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise ModelError(f"--adapter {p} holds no adapter: no {META_FILE} in {p} or in "
                     f"{p / ADAPTER_DIR}; give the folder `fedrg train --out` or `fedrg "
                     "simulate` wrote (or its adapter/ folder)")


def cohort_notes(cohort: Any) -> list[str]:
    """What training on ``cohort`` cannot learn, said instead of a silent null metric."""
    import numpy as np

    notes = []
    markers = cohort.data_cfg.markers
    known = (~np.isnan(cohort.markers)).sum(axis=0) if len(cohort) else np.zeros(len(markers))
    for j, m in enumerate(markers):
        if known[j] == 0:
            notes.append(f"marker {m} has no labels in this cohort: the marker head learns "
                         f"nothing for it and its AUROC stays undefined")
    if len(cohort) and not any(r.strip() for r in cohort.reports):
        notes.append("no patient has a report: the model trains on the markers only (no "
                     "report loss), and findings F1 / ROUGE-L stay undefined")
    return notes


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    return obj


def run_train(
    cohort_dir: Path,
    out: Path,
    *,
    dp: bool,
    config: Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train an adapter on one cohort, evaluate on its held-out split, write OUT.

    Writes the adapter into ``OUT/adapter`` and ``OUT/metrics.json`` (train metrics, the
    held-out evaluation of the start (``start``) and of the kept adapter (``eval``), which one
    was kept (``kept``), parameter counts, payload bytes, and epsilon when DP is on).
    Returns the metrics.
    """
    import torch

    from fedrg.config import load_config
    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset, split_indices
    from fedrg.model.adapter import build_model
    from fedrg.model.io import save_adapter
    from fedrg.model.payload import adapter_manifest, get_adapter_arrays, set_adapter_arrays
    from fedrg.paths import ensure_writable
    from fedrg.policy import EvaluationPolicy, SitePolicy
    from fedrg.train.evaluate import evaluate
    from fedrg.train.loop import train_local
    from fedrg.train.schedule import local_steps

    cfg = load_config(config, overrides)
    ensure_writable(out, setting="--out")  # before any work, not after training
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    cohort = load_cohort(cohort_dir, cfg.data)
    for note in cohort_notes(cohort):
        _progress(f"note: {note}")
    train_idx, val_idx = split_indices(cohort, cfg.data)
    train_ds = CohortDataset(cohort, cfg.data, train_idx)
    val_ds = CohortDataset(cohort, cfg.data, val_idx)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, cfg.data, seed=cfg.training.seed)
    from fedrg.train.public_init import PUBLIC_INIT_SYNTHETIC, apply_public_init

    if cfg.model.public_init == PUBLIC_INIT_SYNTHETIC:
        _progress("preparing the public initial adapter (built once, then cached)")
    init = apply_public_init(model, cfg.model, cfg.data, cfg.training)
    metrics: dict[str, Any] = {
        "cohort_patients": len(cohort),
        "train_patients": len(train_idx),
        "val_patients": len(val_idx),
        "parameters": model.parameter_counts(),
        "config_hash": cfg.config_hash(),
        "initial_adapter": init,
    }
    # the start, scored like the end: what training on this cohort adds is the difference
    _progress(f"evaluating the start on {len(val_ds)} held-out patients")
    metrics["start"] = evaluate(model, val_ds)
    start_arrays = get_adapter_arrays(model)
    privacy = None
    # `fedrg train` is the centralised baseline: training.train_epochs (rounds: local_epochs)
    tcfg = cfg.training.model_copy(update={
        "local_epochs": cfg.training.train_epochs,
        "lr": cfg.training.train_lr,
        "lora_lr_scale": cfg.training.train_lora_lr / cfg.training.train_lr,
    })
    steps = local_steps(local_epochs=tcfg.local_epochs, batch_size=tcfg.batch_size,
                        n_records=len(train_ds))
    plan = None
    if dp and cfg.privacy.enabled:
        from fedrg.hospital.plan import Spent, plan_training
        from fedrg.privacy.dpsgd import DPSession

        # the one plan a hospital makes, for a single "round" of train_epochs under a policy
        # whose caps are this request's own (delta and accountant: the policy defaults)
        policy = SitePolicy(epsilon_budget=cfg.privacy.target_epsilon,
                            epsilon_per_run=cfg.privacy.target_epsilon, max_local_steps=max(steps, 1),
                            max_grad_norm_cap=cfg.privacy.max_grad_norm, max_sample_rate=1.0,
                            min_noise_multiplier=0.0, evaluation=EvaluationPolicy(release="none"))
        one_round = cfg.model_copy(update={"training": tcfg, "federation": cfg.federation.model_copy(
            update={"rounds": 1})})
        plan = plan_training(one_round, policy, n_train=len(train_ds), spent=Spent(),
                             run_id="fedrg-train", round_=1)
        privacy = DPSession.for_plan(plan, privacy_cfg=cfg.privacy, training_cfg=tcfg)
        metrics["privacy"] = {"noise_multiplier": plan.noise_multiplier,
                              "sample_rate": plan.sample_rate, "steps": plan.steps,
                              "target_delta": plan.target_delta, "accountant": plan.accountant}
    with StepProgress(f"training {steps} steps on {len(train_ds)} patients "
                      f"({'DP-SGD' if privacy is not None else 'no DP'})", steps) as bar:
        metrics["train"] = train_local(model, train_ds, tcfg, steps=steps, privacy=privacy,
                                       on_step=bar.update,
                                       frozen=cfg.privacy.frozen_under_dp if privacy else ())
    if privacy is not None and plan is not None:
        metrics["privacy"]["epsilon"] = privacy.epsilon(target_delta=plan.target_delta)
    _progress(f"evaluating on {len(val_ds)} held-out patients")
    metrics["eval"] = evaluate(model, val_ds)
    for note in metrics["eval"].get("notes", []):
        _progress(f"note: {note}")
    for line in start_and_end_lines(metrics["start"], metrics["eval"], list(cfg.data.markers)):
        _progress(line)
    metrics["kept"] = keep_better(metrics["start"], metrics["eval"], private=privacy is not None)
    if metrics["kept"] == "start":
        set_adapter_arrays(model, start_arrays)
        metrics["eval"] = metrics["start"]
        _progress("kept the START adapter: training lowered the mean multimodal AUROC on the "
                  "held-out patients (no DP, so choosing by them releases nothing)")
    elif privacy is not None:
        _progress("kept the trained adapter (DP: choosing between start and end by the held-out "
                  "patients would be a release no accountant covers)")
    save_adapter(model, Path(out) / ADAPTER_DIR)
    manifest = adapter_manifest(model)
    metrics["payload_bytes"] = manifest["bytes"]
    metrics["payload_sha256"] = manifest["sha256"]
    (Path(out) / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2))
    return metrics


def _mean_multimodal(ev: dict[str, Any]) -> float | None:
    xs = [v for v in (ev.get("auroc_multimodal") or {}).values() if v is not None]
    return sum(xs) / len(xs) if xs else None


def keep_better(start: dict[str, Any], end: dict[str, Any], *, private: bool) -> str:
    """``'start'`` or ``'trained'``: without DP, the adapter with the higher mean multimodal
    AUROC on the held-out patients; with DP always the trained one (a choice made by the
    held-out patients would be a release that no accountant covers)."""
    if private:
        return "trained"
    a, b = _mean_multimodal(start), _mean_multimodal(end)
    return "start" if a is not None and b is not None and a > b else "trained"


def start_and_end_lines(start: dict[str, Any], end: dict[str, Any], markers: list[str]) -> list[str]:
    """The held-out AUROCs of the start and of the trained adapter, side by side."""
    lines = [f"{'held-out AUROC':<34} {'start':>6} {'end':>6} {'change':>7}"]
    for key, label in (("auroc_multimodal", "multimodal"), ("auroc", "image-only")):
        for m in markers:
            a, b = (start.get(key) or {}).get(m), (end.get(key) or {}).get(m)
            if a is None or b is None:
                lines.append(f"{label + ' ' + m:<34} {'-' if a is None else f'{a:.3f}':>6} "
                             f"{'-' if b is None else f'{b:.3f}':>6} {'-':>7}")
            else:
                lines.append(f"{label + ' ' + m:<34} {a:>6.3f} {b:>6.3f} {b - a:>+7.3f}")
    return lines


def run_predict(adapter: Path, cohort_dir: Path, *, patient: str | None = None,
                batch_size: int = 16) -> list[dict[str, Any]]:
    """One dict per patient: ``patient_id``; ``report``, generated by the model (always:
    ``report_is_generated`` is True); ``reference_report``, the cohort's own report or
    ``None`` when it has none; marker probabilities with and without genomics.

    ``adapter`` is an adapter folder or a folder holding one as ``adapter/`` (see
    :func:`resolve_adapter`).
    """
    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset
    from fedrg.errors import CohortError, Problem
    from fedrg.model.io import load_adapter
    from fedrg.train.loop import collate

    model = load_adapter(resolve_adapter(adapter))
    model.eval()
    cohort = load_cohort(cohort_dir, model.data_cfg)
    indices = list(range(len(cohort)))
    if patient is not None:
        if patient not in cohort.patient_ids:
            raise CohortError(str(cohort_dir), [Problem("manifest.csv",
                                                        f"patient {patient!r} not found")])
        indices = [cohort.patient_ids.index(patient)]
    ds = CohortDataset(cohort, model.data_cfg, indices)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        reports = model.generate_reports(batch)
        probs = model.marker_probabilities(batch).cpu().numpy()
        probs_img = model.marker_probabilities(batch, withhold_genomics=True).cpu().numpy()
        for i, pid in enumerate(batch["patient_id"]):
            reference = str(batch["report"][i]).strip()
            rows.append({
                "patient_id": pid,
                "report": reports[i],
                "report_is_generated": True,
                "reference_report": reference or None,
                "markers": {m: round(float(probs[i, j]), 4)
                            for j, m in enumerate(model.data_cfg.markers)},
                "markers_image_only": {m: round(float(probs_img[i, j]), 4)
                                       for j, m in enumerate(model.data_cfg.markers)},
                "has_genomics": bool(batch["has_genomics"][i] > 0.5),
            })
    return rows


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``predict`` to ``app``."""

    @app.command("train")
    def train_cmd(
        cohort: Path = typer.Option(..., "--cohort", help="cohort directory"),
        out: Path = typer.Option(..., "--out", help="output directory (adapter + metrics.json)"),
        no_dp: bool = typer.Option(False, "--no-dp", help="train without differential privacy"),
        config: Path | None = typer.Option(None, "--config", help="TOML config file"),
        overrides: list[str] = typer.Option([], "--set", help="section.key=value override"),
        eval_before: bool = typer.Option(
            False, "--eval-before", hidden=True, help="kept for old scripts: the start is "
            "always evaluated now"),
    ) -> None:
        """Train the adapter on one cohort; write OUT/metrics.json and the adapter."""
        from fedrg.interrupt import Interrupted, exit_interrupted, graceful_interrupt

        hint = (f"Nothing was saved to {out} unless metrics.json is there; run the same "
                "command again to train from the start.")
        try:
            with graceful_interrupt("fedrg train", hint=hint):
                m = run_train(cohort, out, dp=not no_dp, config=config, overrides=overrides)
        except FedrgError as err:
            _fail(err)
            return
        except Interrupted:
            exit_interrupted("fedrg train", hint)
        ev = m["eval"]
        typer.echo(json.dumps(_json_safe({
            "out": str(out), "adapter": str(Path(out) / ADAPTER_DIR),
            "val_patients": m["val_patients"], "loss": ev["loss"],
            "auroc": ev["auroc"], "auroc_multimodal": ev["auroc_multimodal"],
            "rouge_l": ev["rouge_l"], "findings_f1": ev["findings_f1"],
            "epsilon": m.get("privacy", {}).get("epsilon"), "kept": m["kept"],
            "start": {"auroc": m["start"]["auroc"], "auroc_multimodal": m["start"]["auroc_multimodal"]},
        })))

    @app.command("predict")
    def predict_cmd(
        adapter: Path = typer.Option(..., "--adapter", help="adapter folder, or the folder "
                                     "`fedrg train --out` / `fedrg simulate` wrote"),
        cohort: Path = typer.Option(..., "--cohort", help="cohort directory"),
        patient: str | None = typer.Option(None, "--patient", help="only this patient id"),
    ) -> None:
        """Print one JSON line per patient: generated report and marker probabilities."""
        try:
            rows = run_predict(adapter, cohort, patient=patient)
        except FedrgError as err:
            _fail(err)
            return
        without = [r["patient_id"] for r in rows if r["reference_report"] is None]
        if without:
            who = (f"patient {without[0]} has" if len(without) == 1
                   else f"{len(without)} of {len(rows)} patients have")
            typer.echo(f"fedrg predict: note: {who} no report in the cohort; the \"report\" "
                       "printed is generated by the model, not a reference "
                       "(\"reference_report\": null)", err=True)
        for row in rows:
            typer.echo(json.dumps(row))

    @app.command("model-hash")
    def model_hash_cmd(
        directory: Path = typer.Argument(..., help="a local base-model directory"),
    ) -> None:
        """Print a base-model directory's content hash (for a site's policy.allowed_base_models)."""
        from fedrg.model.fingerprint import model_content_hash

        try:
            typer.echo(f"sha256:{model_content_hash(directory)}")
        except FedrgError as err:
            _fail(err)
