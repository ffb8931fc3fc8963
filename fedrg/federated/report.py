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


def privacy_label(metrics: dict[str, Any], *, dp_enabled: bool,
                  target_epsilon: float | None = None) -> str:
    """``"DP on, max eps 6.27 of target 8"`` or ``"DP OFF"``, for plot titles."""
    if not dp_enabled:
        return "DP OFF"
    eps = [v for row in metrics.get("rounds", []) for v in (row.get("epsilon") or {}).values()
           if v is not None]
    spent = f", max eps {max(eps):.2f}" if eps else ""
    target = f" of target {target_epsilon:g}" if target_epsilon is not None and eps else ""
    return f"DP on{spent}{target}"


def write_plots(metrics: dict[str, Any], out_dir: str | Path, *, dp_label: str = "") -> list[Path]:
    """Write one PNG per metric family (AUROC, loss, findings F1, epsilon) over rounds.

    Rounds are integer ticks; round 0 (the starting adapter) is marked; AUROC panels show
    the chance line at 0.5 on a fixed 0-1 axis, loss starts at 0; each title ends with
    ``dp_label`` (:func:`privacy_label`).
    """
    from matplotlib.ticker import MaxNLocator

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if key in ("auroc", "auroc_multimodal"):
            ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance (0.5)")
            ax.set_ylim(0, 1)
        elif key == "findings_f1":
            ax.set_ylim(0, 1)
        else:
            ax.set_ylim(bottom=0)
        if any(row.get("round") == 0 for row in rounds):
            ax.axvline(0, color="black", ls=":", lw=1)
            ax.annotate("start (round 0)", xy=(0, 0.02), xycoords=("data", "axes fraction"),
                        fontsize=7, ha="left")
        ax.set_title(f"{title}\n{dp_label}" if dp_label else title, fontsize=10)
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


def metric_interval(row: dict[str, Any], key: str, marker: str | None = None) -> list[float] | None:
    """The row's noise interval of ``key`` (``marker``'s for AUROC), None when the release
    was exact or absent."""
    iv = (row.get("interval") or {})
    if not iv.get("noise_std"):
        return None
    value = iv.get(key)
    if marker is not None:
        value = (value or {}).get(marker)
    return value if isinstance(value, list) and len(value) == 2 else None


def metric_text(row: dict[str, Any], key: str, marker: str | None = None, *,
                compact: bool = False) -> str:
    """A released metric as the console shows it: ``0.624 [0.410, 0.830]`` for a DP release
    (its 95 % noise interval), ``noise swamps [0.00, 1.00]`` when the interval of a metric
    in [0, 1] is wider than :data:`fedrg.privacy.release.SWAMP_WIDTH` (then no point value
    is shown, it would say nothing), the bare value for an exact release; ``-`` without one. ``compact`` for table
    cells: the interval alone, ``.41-.83``, and ``swamped``."""
    from fedrg.privacy.release import noise_swamps

    value = row.get(key)
    if marker is not None:
        value = (value or {}).get(marker)
    iv = metric_interval(row, key, marker)
    if iv is not None and key != "loss" and noise_swamps(iv):  # metrics in [0, 1]
        return "swamped" if compact else f"noise swamps [{iv[0]:.2f}, {iv[1]:.2f}]"
    if value is None:
        return "-"
    if iv is None:
        return _fmt(float(value))
    if compact:
        return f"{iv[0]:.2f}-{iv[1]:.2f}".replace("0.", ".").replace("1.00", "1")
    return f"{float(value):.3f} [{iv[0]:.3f}, {iv[1]:.3f}]"


def release_text(row: dict[str, Any]) -> str:
    """Where a row's metrics came from: ``DP-released by h1, h2 (95% intervals for the
    noise)``, ``exact release by h1``, the evaluation declines, or ``no metrics released``."""
    by = row.get("released_by") or []
    declined = row.get("evaluation_declined") or {}
    kind = row.get("released")
    parts = []
    if by:
        label = {"dp": "DP-released", "exact": "exact release",
                 "dp+exact": "released (DP and exact)"}.get(str(kind), "released")
        level = (row.get("interval") or {}).get("level", 0.95)
        noisy = f" ({level:.0%} intervals for the noise)" if kind and "dp" in str(kind) else ""
        parts.append(f"{label} by {', '.join(map(str, by))}{noisy}")
    elif kind is None and "released_by" in row:
        parts.append("no metrics released")
    if declined:
        parts.append("evaluation declined: " + ", ".join(f"{h} ({r})" for h, r in sorted(declined.items())))
    return "; ".join(parts)


def max_epsilon_text(row: dict[str, Any], no_dp: set[str] | None = None) -> str:
    """A round's ``max eps`` cell: the largest epsilon of the hospitals that trained with
    DP; ``no DP`` when every hospital of the round trained without DP (never ``0.000``);
    ``-`` when none reported one."""
    no_dp = no_dp or set()
    eps = {h: v for h, v in (row.get("epsilon") or {}).items() if h not in no_dp}
    if eps:
        return _fmt(max(eps.values()))
    return "no DP" if no_dp else "-"


def round_table(rounds: list[dict[str, Any]], markers: list[str],
                no_dp: dict[int, set[str]] | None = None) -> Table:
    """A rich table with one line per round, within 80 columns for up to four markers.

    Marker AUROC columns are headed ``A1``, ``A2``, ... and named in the caption, so no
    header is cut short. ``no_dp`` maps a round to the hospitals that trained in it without
    DP (read from their ledgers): their epsilon is left out of ``max eps``, which says
    ``no DP`` when no hospital of the round used DP.
    """
    from rich import box

    caption = "; ".join(f"A{i} = AUROC {m}" for i, m in enumerate(markers, start=1))
    if any(metric_interval(r, "auroc", m) for r in rounds for m in markers):
        caption += ("; DP-released metrics as their 95% noise interval (low-high), 'swamped' "
                    "where it is wider than 0.5")
    table = Table(title="fedrg federation", caption=caption, box=box.SIMPLE_HEAD,
                  title_justify="left", caption_justify="left", show_lines=False,
                  padding=(0, 1), pad_edge=False, collapse_padding=True)
    for col in ["round", "hospitals", "loss", *[f"A{i}" for i in range(1, len(markers) + 1)],
                "F1", "max eps", "MB up", "s"]:
        table.add_column(col, justify="right", no_wrap=True)
    for row in rounds:
        table.add_row(
            str(row["round"]),
            f"{row.get('participants', 0)}" + (f" (-{len(row['declined'])})" if row.get("declined") else ""),
            _fmt(row.get("loss")),
            *[metric_text(row, "auroc", m, compact=True) for m in markers],
            metric_text(row, "findings_f1", compact=True),
            max_epsilon_text(row, (no_dp or {}).get(int(row["round"]))),
            f"{row.get('bytes_up', 0) / 1e6:.2f}",
            f"{row['seconds']:.0f}" if row.get("seconds") is not None else "-",
        )
    return table


def gains_over_start(rounds: list[dict[str, Any]], markers: list[str]) -> dict[str, dict[str, float]]:
    """Per marker, the last round's AUROC minus round 0's (the starting adapter's), image-only
    (``auroc``) and multimodal (``auroc_multimodal``); markers without both are left out."""
    start = next((r for r in rounds if r.get("round") == 0), None)
    last = next((r for r in reversed(rounds) if r.get("round", 0) > 0 and r.get("auroc_multimodal")),
                None)
    out: dict[str, dict[str, float]] = {}
    if start is None or last is None:
        return out
    for key in ("auroc", "auroc_multimodal"):
        for m in markers:
            a, b = (start.get(key) or {}).get(m), (last.get(key) or {}).get(m)
            if a is not None and b is not None:
                out.setdefault(key, {})[m] = float(b) - float(a)
    return out


def gain_line(rounds: list[dict[str, Any]], markers: list[str]) -> str | None:
    """``what the federation added over its start (round 0 -> round 3): multimodal idh_mutant
    0.702 -> 0.851 (+0.149), ...``; None without a round 0 row or an evaluated last round.
    DP-released values carry their noise intervals; where either release is swamped by its
    noise no gain is shown."""
    gains = gains_over_start(rounds, markers)
    if not gains:
        return None
    start = next(r for r in rounds if r.get("round") == 0)
    last = next(r for r in reversed(rounds) if r.get("round", 0) > 0 and r.get("auroc_multimodal"))
    from fedrg.privacy.release import noise_swamps

    parts = []
    for key, label in (("auroc_multimodal", "multimodal"), ("auroc", "image-only")):
        for m, g in gains.get(key, {}).items():
            if any(noise_swamps(metric_interval(r, key, m)) for r in (start, last)):
                parts.append(f"{label} {m}: noise swamps the release, no gain to show")
            else:
                parts.append(f"{label} {m} {metric_text(start, key, m)} -> "
                             f"{metric_text(last, key, m)} ({g:+.3f})")
    return (f"what the federation added over its start (round 0 -> round {last['round']}): "
            + "; ".join(parts))
