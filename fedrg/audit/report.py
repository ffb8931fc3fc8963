"""Self-contained HTML report of a privacy audit, written for an ethics board.

One page: a summary verdict, the audit table, per hospital an epsilon-over-rounds plot
(matplotlib PNG embedded as base64) and the mechanism described in plain words, then the
problems found. No external resources (scripts, fonts, images) are referenced.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedrg.audit.verify import AuditResult, HospitalAudit


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return "∞"
    return f"{x:.{digits}f}"


def _span(values: list[float], fmt: str = "{:.4g}") -> str:
    uniq = sorted(set(values))
    if not uniq:
        return "—"
    if len(uniq) == 1:
        return fmt.format(uniq[0])
    return f"{fmt.format(uniq[0])}–{fmt.format(uniq[-1])}"


def epsilon_plot_png(h: HospitalAudit) -> bytes:
    """PNG of recorded and recomputed cumulative epsilon per ledger entry, with the budget
    (entries without DP marked apart)."""
    fig = epsilon_figure(h)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def epsilon_figure(h: HospitalAudit) -> Any:
    """The matplotlib Figure behind :func:`epsilon_plot_png` (y axis scaled to the data;
    the budget drawn when in view, else named on the chart)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(1, len(h.entries) + 1))
    ax.plot(xs, [e.epsilon_recorded for e in h.entries], "o-", label="recorded (ledger)")
    rec = [e.epsilon_recomputed_rdp for e in h.entries]
    if all(math.isfinite(v) for v in rec):
        ax.plot(xs, rec, "x--", label="dp_accounting RDP (information)")
    pld = [(x, e.epsilon_recomputed_pld) for x, e in zip(xs, h.entries, strict=True)
           if e.epsilon_recomputed_pld is not None
           and math.isfinite(e.epsilon_recomputed_pld)]
    if pld:
        ax.plot(*zip(*pld, strict=True), "s", ms=4, label="dp_accounting PLD (proven)")
    plain = [(x, e.epsilon_recorded) for x, e in zip(xs, h.entries, strict=True)
             if not e.private and e.kind != "reinit"]
    if plain:  # entries without DP: no epsilon covers them, whatever the curve says
        ax.plot(*zip(*plain, strict=True), "X", color="darkorange", ms=9, ls="none",
                label="entry WITHOUT DP (no ε covers it)")
    # Scale to the data, not to the budget (a budget of 100 would flatten the curve);
    # mark the budget as a line when it is in view, else say where it is.
    shown = [v for v in [e.epsilon_recorded for e in h.entries] + rec + [v for _, v in pld]
             if math.isfinite(v)]
    top = max(shown, default=1.0) * 1.15 or 1.0
    budgets = [e.budget for e in h.entries]
    if budgets and min(budgets) <= top * 1.3:
        ax.step(xs, budgets, where="mid", color="crimson", label="budget")
        top = max(top, max(budgets) * 1.05)
    elif budgets:
        ax.axhline(top, color="crimson", lw=2)
        ax.annotate(f"budget ε = {_span(budgets)} (above this chart)", (0.01, 0.97),
                    xycoords="axes fraction", va="top", fontsize=8, color="crimson")
    # Mark where a new run starts.
    for i in range(1, len(h.entries)):
        if h.entries[i].run_id != h.entries[i - 1].run_id:
            ax.axvline(i + 0.5, color="grey", lw=0.8, ls=":")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ledger entry (one per round or release; dotted lines separate runs)")
    ax.set_ylabel("cumulative ε")
    ax.set_title(f"{h.hospital}: privacy spent over rounds")
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plain_words(h: HospitalAudit) -> str:
    """The mechanism and guarantee of one hospital in plain words (HTML-escaped text).

    A hospital with any entry made without DP is never said to be protected by
    differential privacy: the entries without DP are named first, and an epsilon is
    given only for the DP entries, as theirs alone.
    """
    cov = h.coverage
    if not h.entries and not cov.mechanisms:
        return "No training on this hospital's data has been recorded."
    parts = [] if h.integrity_ok else [
        "Caution: this ledger FAILED the audit (see the problems below), so the figures "
        "that follow are only what the ledger claims, not established facts."
    ]
    if cov.not_private:
        what = "; ".join(cov.not_private)
        if cov.has_dp:
            parts.append(f"NOT everything done with this hospital's data was differentially "
                         f"private. Without DP: {what}. No differential-privacy guarantee "
                         "covers these, so the ε below does not protect this hospital's "
                         "patients from them.")
        else:
            parts.append(f"NO differential privacy: nothing done with this hospital's data "
                         f"was differentially private ({what}). No differential-privacy "
                         "guarantee covers this hospital's patients, and there is no ε.")
    dp_train = [m for m in cov.mechanisms if m.private and m.kind == "train"]
    dp_release = [m for m in cov.mechanisms if m.private and m.kind == "evaluation"]
    if dp_train:
        q = sorted({m.sample_rate for m in dp_train})
        sigma = sorted({m.noise_multiplier for m in dp_train})
        clip = sorted({c for m in dp_train for c in m.max_grad_norms})
        q_text = f"{q[0]:.2%}" if len(q) == 1 else f"between {q[0]:.2%} and {q[-1]:.2%}"
        sigma_text = f"{sigma[0]:.3g}" if len(sigma) == 1 else f"{sigma[0]:.3g} to {sigma[-1]:.3g}"
        clip_text = f"{clip[0]:.3g}" if len(clip) == 1 else f"{clip[0]:.3g} to {clip[-1]:.3g}"
        parts += [
            f"The model was trained at {h.hospital} with differentially private stochastic "
            f"gradient descent (DP-SGD) in {cov.dp_rounds} round(s) and {cov.dp_steps:,} "
            f"training steps in total, over {h.runs} run(s).",
            f"At every step each patient's record was used with a chance of {q_text}, "
            "decided independently by a coin flip (so nobody can tell from the step who "
            "took part).",
            f"Each patient's influence on a step was capped (the gradient clipped to a length "
            f"of at most {clip_text}), and random Gaussian noise was added whose size is "
            f"{sigma_text} times that cap.",
        ]
    if dp_release:
        parts.append(f"Validation metrics left the hospital in {cov.dp_releases} release(s), "
                     "each with Gaussian noise (a DP release).")
    if cov.has_dp:
        eps = h.epsilon_recorded
        delta = h.deltas[-1] if h.deltas else math.nan
        factor = math.exp(eps) if eps < 50 else math.inf
        who = ("every patient is protected by differential privacy"
               if not cov.not_private else
               "these differentially private parts alone (not the entries without DP "
               "named above) satisfy differential privacy")
        parts += [
            f"Taken over all of this, {who} with ε = {_fmt(eps, 2)} and δ = {delta:.1e}: "
            f"whatever anyone learns from {'them' if cov.not_private else 'the trained model'}"
            f", its chance is at most e^ε ≈ {_fmt(factor, 1)} times what it would have been "
            "had that patient's record never been used, except with a probability of at "
            "most δ.",
            f"Smaller ε means stronger protection. The hospital's lifetime budget is "
            f"ε = {_fmt(h.budget, 2)}; "
            + ("it was respected." if h.within_budget else "it was NOT respected."),
            f"An independent recomputation from the recorded mechanism proves ε = "
            f"{_fmt(h.epsilon_recomputed_pld, 2)} ({h.recompute_method}); the looser RDP "
            f"bound is ε = {_fmt(h.epsilon_recomputed_rdp, 2)}.",
        ]
    return " ".join(html.escape(p) for p in parts)


def _eps(h: HospitalAudit, x: float | None, digits: int = 3) -> str:
    """An epsilon cell: ``no DP`` for a hospital without any DP entry, ∞ for infinity."""
    text = h.eps(x, digits)
    return "∞" if text == "inf" else text


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1b1b1b;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.35rem .5rem;text-align:right}
th{background:#f2f4f7}td:first-child,th:first-child{text-align:left}
.ok{color:#0a7a2f;font-weight:600}.fail{color:#b00020;font-weight:600}
.verdict{padding:.8rem 1rem;border-radius:6px;font-size:1.1rem}
.warn{color:#8a5300;font-weight:600}
.verdict.ok{background:#e7f6ec}.verdict.fail{background:#fde8ec}.verdict.warn{background:#fff4de}
img{max-width:100%;height:auto;border:1px solid #eee}
.small{color:#555;font-size:.85rem}
"""


def _verdict(result: AuditResult) -> tuple[str, str]:
    """The page's verdict: (CSS class, text)."""
    status = result.status
    if status == "OK":
        return "ok", ("All ledgers verified; the independently recomputed privacy loss agrees "
                      "with the recorded one, every hospital stayed within its budget, and "
                      "every recorded use of the data was differentially private.")
    if status == "FAILED":
        return "fail", "The audit FAILED for at least one hospital: see the problems below."
    named = "; ".join(f"{h.hospital}: {h.status}" for h in result.hospitals
                      if h.status != "OK")
    if status == "NOT PRIVATE":
        return "warn", ("All ledgers verified, but NO hospital's data was protected by "
                        f"differential privacy ({named}). There is no ε to report.")
    return "warn", ("All ledgers verified, but NOT all data was protected by differential "
                    f"privacy ({named}): the entries without DP are named under each "
                    "hospital below, and no ε covers them.")


def render_html(result: AuditResult) -> str:
    """Render the audit as one self-contained HTML page."""
    esc = html.escape
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verdict_cls, verdict = _verdict(result)
    rows = []
    mech_rows = []
    for h in result.hospitals:
        cls = {"OK": "ok", "PARTIAL": "warn", "NOT PRIVATE": "warn"}.get(h.status, "fail")
        cov = h.coverage
        rows.append(
            "<tr>"
            f"<td>{esc(h.hospital)}</td><td>{h.runs}</td><td>{cov.rounds}</td>"
            f"<td>{cov.steps:,}</td><td>{cov.releases}</td>"
            f"<td>{cov.plain_rounds + cov.exact_releases}</td>"
            f"<td>{esc(_eps(h, h.epsilon_recorded))}</td>"
            f"<td>{esc(_eps(h, h.epsilon_recomputed))}</td>"
            f"<td>{esc(_eps(h, h.epsilon_recomputed_rdp))}</td><td>{_fmt(h.budget, 2)}</td>"
            f"<td class='{cls}'>{esc(h.status)}</td></tr>"
        )
        for m in cov.mechanisms:
            mcls = "" if m.private else " class='warn'"
            mech_rows.append(
                f"<tr><td>{esc(h.hospital)}</td><td{mcls}>{esc(m.label)}</td>"
                f"<td>{esc(m.accountant)}</td><td>{m.entries} {esc(m.unit)}</td>"
                f"<td>{m.steps:,}</td><td>{m.noise_multiplier:.4g}</td>"
                f"<td>{m.sample_rate:.4g}</td><td>{m.delta:.1e}</td>"
                f"<td>{esc(_span(list(m.max_grad_norms)))}</td></tr>")
    sections = []
    for h in result.hospitals:
        block = [f"<h2>{esc(h.hospital)}</h2>",
                 f"<p class='small'>Ledger: <code>{esc(str(h.ledger))}</code><br>"
                 f"Public key: <code>{esc(str(h.public_key) if h.public_key else 'none')}"
                 "</code></p>",
                 f"<p>Status: <span class='{'ok' if h.ok else 'warn' if h.integrity_ok else 'fail'}'>"
                 f"{esc(h.status)}</span></p>",
                 f"<p>{plain_words(h)}</p>"]
        if h.entries and h.has_dp:
            png = base64.b64encode(epsilon_plot_png(h)).decode("ascii")
            block.append(
                f"<img alt='cumulative epsilon over rounds for {esc(h.hospital)}' "
                f"src='data:image/png;base64,{png}'>"
            )
        if h.problems:
            items = "".join(f"<li>{esc(p)}</li>" for p in h.problems)
            block.append(f"<p class='fail'>Problems found:</p><ul>{items}</ul>")
        else:
            block.append("<p class='ok'>Hash chain and signatures verified; no problems "
                         "found.</p>" if h.verified else "")
        if h.warnings:
            items = "".join(f"<li>{esc(w)}</li>" for w in h.warnings)
            block.append(f"<p>Notes:</p><ul class='small'>{items}</ul>")
        sections.append("\n".join(block))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedrg privacy audit</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Privacy audit</h1>
<p class="small">Audited path: <code>{esc(str(result.path))}</code> · generated {now}
by <code>fedrg audit</code></p>
<p class="verdict {verdict_cls}">{esc(verdict)}</p>
<h2>Summary</h2>
<table>
<thead><tr><th>hospital</th><th>runs</th><th>training rounds</th><th>training steps</th>
<th>evaluation releases</th><th>entries without DP</th><th>ε recorded</th>
<th>ε recomputed</th><th>ε RDP</th><th>budget</th><th>status</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody>
</table>
<p class="small">Statuses: OK (verified; every entry differentially private), PARTIAL
(verified; some entries were not differentially private: rounds trained without DP-SGD or
metrics released exactly, named below), NOT PRIVATE (verified; no entry was differentially
private, so there is no ε: “no DP”); any other status is a failed verification.</p>
<h2>Mechanisms</h2>
<p class="small">One row per distinct mechanism of each hospital (kind, accountant, noise
multiplier, sample rate, δ), with how many training rounds or evaluation releases used
it.</p>
<table>
<thead><tr><th>hospital</th><th>mechanism</th><th>accountant</th><th>used</th>
<th>steps</th><th>noise multiplier</th><th>sample rate</th><th>δ</th>
<th>clipping / sensitivity</th></tr></thead>
<tbody>
{"".join(mech_rows)}
</tbody>
</table>
<p class="small">“ε recorded” is what the hospital's signed ledger says. “ε recomputed”
(the privacy-loss-distribution accountant, PLD) was computed for this report from the
recorded mechanism parameters alone, with Google's dp_accounting library (not the training
code): it is the smallest ε that can be proven for that mechanism. A ledger fails only when
it records less than that (by more than 1&nbsp;%), i.e. understates the privacy loss;
recording more (a looser but valid bound, as the RDP accountant gives) is not a fault.
“ε RDP” is dp_accounting's RDP bound, shown for information. Every ε covers the
differentially private entries only; entries without DP are covered by none.</p>
<h2>What each ledger proves</h2>
<p>Every round of training and every release of metrics appends one line to the
hospital's ledger, signed with the
hospital's private key and chained to the line before it by a cryptographic hash. Changing,
removing or reordering any line breaks a signature or the chain, which this audit
checks.</p>
{"".join(sections)}
</body>
</html>
"""


def write_html(result: AuditResult, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``path`` (UTF-8) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(result), encoding="utf-8")
    return out
