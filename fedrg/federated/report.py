"""Plots and the end-of-run summary of a federated run's ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table


def _series(rounds: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rounds:
        value = row.get(key)
        if isinstance(value, dict):
            for name, v in value.items():
                if v is not None:
                    out.setdefault(name, []).append((row["round"], float(v)))
        elif value is not None:
            out.setdefault(key, []).append((row["round"], float(value)))
    return out


def write_plots(metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write one PNG per metric family (AUROC, loss, findings F1, epsilon) over rounds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = metrics.get("rounds", [])
    panels = [
        ("auroc", "Image-only AUROC (held-out patients)", "AUROC"),
        ("auroc_multimodal", "Image + genomics AUROC", "AUROC"),
        ("loss", "Validation loss", "loss"),
        ("findings_f1", "Findings F1 of generated reports", "F1"),
        ("epsilon", "Cumulative epsilon per hospital", "epsilon"),
    ]
    written = []
    for key, title, ylabel in panels:
        series = _series(rounds, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for name, pts in sorted(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1 or key in ("auroc", "auroc_multimodal", "epsilon"):
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def round_table(rounds: list[dict[str, Any]], markers: list[str]) -> Table:
    """A rich table with one line per round."""
    table = Table(title="fedrg federation", show_lines=False)
    for col in ["round", "hospitals", "loss", *[f"AUROC {m}" for m in markers], "findings F1",
                "max eps", "MB up", "s"]:
        table.add_column(col, justify="right")
    for row in rounds:
        eps = row.get("epsilon") or {}
        table.add_row(
            str(row["round"]),
            f"{row.get('participants', 0)}" + (f" (-{len(row['declined'])})" if row.get("declined") else ""),
            _fmt(row.get("loss")),
            *[_fmt((row.get("auroc") or {}).get(m)) for m in markers],
            _fmt(row.get("findings_f1")),
            _fmt(max(eps.values()) if eps else None),
            f"{row.get('bytes_up', 0) / 1e6:.2f}",
            _fmt(row.get("seconds")),
        )
    return table
