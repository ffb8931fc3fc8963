"""The HTML audit report: self-contained, parses, embeds one plot per hospital, renders."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from privacy_ledger_helpers import STANDARD_ROUNDS, write_ledger
from typer.testing import CliRunner

from fedrg.audit.report import plain_words, render_html
from fedrg.audit.verify import audit_path
from fedrg.commands import audit as audit_cmd

CHROMIUM = Path("/usr/bin/chromium")


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def html_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("run")
    write_ledger(root / "hospitals" / "hospital-1" / "state", STANDARD_ROUNDS,
                 hospital="hospital-1")
    write_ledger(root / "hospitals" / "hospital-2" / "state",
                 [("run-a", 1, 1.3, 0.1, 20), ("run-a", 2, 1.3, 0.1, 20)],
                 hospital="hospital-2", budget=6.0)
    out = root / "report" / "audit.html"
    app = typer.Typer()
    audit_cmd.register(app)
    app.command("noop", hidden=True)(lambda: None)
    res = CliRunner().invoke(app, ["audit", str(root), "--html", str(out)])
    assert res.exit_code == 0, res.output
    return out, out.read_text(encoding="utf-8")


def test_html_parses_and_embeds_plots(html_report: tuple[Path, str]) -> None:
    _, page = html_report
    p = _Collector()
    p.feed(page)
    p.close()
    assert p.stack == []  # every element closed
    imgs = [a for t, a in p.tags if t == "img"]
    assert len(imgs) == 2  # one plot per hospital
    for a in imgs:
        src = a["src"] or ""
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            assert im.size[0] > 300 and im.size[1] > 150
    # Self-contained: nothing is fetched from elsewhere.
    for t, a in p.tags:
        assert t not in ("script", "link", "iframe")
        for k in ("src", "href"):
            assert not (a.get(k) or "").startswith(("http:", "https:", "//"))
    text = " ".join(p.text)
    assert "hospital-1" in text and "hospital-2" in text
    assert text.count("OK") >= 2
    assert "differential privacy" in text  # the mechanism in plain words
    rows = [t for t, _ in p.tags if t == "tr"]
    # summary: header + two hospitals; mechanisms: header + one row per distinct mechanism
    # (hospital-1 trained with two, sigma 1.1 / q 0.05 and sigma 0.9 / q 0.04; hospital-2 one)
    assert len(rows) == 3 + 4


def test_plain_words_mentions_the_mechanism(tmp_path: Path) -> None:
    state = tmp_path / "h" / "state"
    write_ledger(state, [("r", 1, 1.1, 0.05, 30)], hospital="st-mary")
    (h,) = audit_path(state).hospitals
    words = plain_words(h)
    for needle in ("st-mary", "5.00%", "1.1 times", "30 training steps", "budget",
                   f"{h.epsilon_recorded:.2f}"):
        assert needle in words, needle
    page = render_html(audit_path(state))
    assert "<script" not in page


def test_failed_audit_page_lists_problems(tmp_path: Path) -> None:
    state = tmp_path / "h" / "state"
    write_ledger(state, [("r", 1, 1.1, 0.05, 30), ("r", 2, 1.1, 0.05, 30)], hospital="h")
    lines = (state / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    (state / "ledger.jsonl").write_bytes(lines[1] + lines[0])
    page = render_html(audit_path(state))
    assert "FAILED" in page and "Problems found" in page and "TAMPERED" in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed "
                    "(apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(html_report: tuple[Path, str], tmp_path: Path
                                           ) -> None:
    from PIL import Image, ImageStat

    path, _ = html_report
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}",
           f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    keep = Path(path.parent / "screenshot.png")
    shutil.copy(shot, keep)
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 2400)
        stat = ImageStat.Stat(rgb)
        assert max(stat.stddev) > 10  # not a blank page
        # The plots rendered: many distinct colours (matplotlib lines), not only text.
        colours = rgb.resize((300, 600)).getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 200


def test_epsilon_chart_is_scaled_to_the_data_with_the_budget_marked(tmp_path) -> None:
    """Issue 15: a budget of 100 must not flatten a curve that ends near 4."""
    from fedrg.audit.report import epsilon_figure
    from fedrg.audit.verify import audit_path

    far = tmp_path / "far" / "state"
    write_ledger(far, [("r", 1, 1.1, 0.05, 30), ("r", 2, 1.1, 0.05, 30)], budget=100.0)
    (h,) = audit_path(far).hospitals
    ax = epsilon_figure(h).axes[0]
    top = ax.get_ylim()[1]
    assert h.epsilon_recorded < top < 2 * h.epsilon_recorded
    assert any("budget ε = 100 (above this chart)" in t.get_text() for t in ax.texts)
    near = tmp_path / "near" / "state"
    write_ledger(near, [("r", 1, 1.1, 0.05, 30), ("r", 2, 1.1, 0.05, 30)], budget=4.0)
    (h,) = audit_path(near).hospitals
    ax = epsilon_figure(h).axes[0]
    assert "budget" in [ln.get_label() for ln in ax.get_lines()]
    assert ax.get_ylim()[1] >= 4.0 and not ax.texts
    assert "dp_accounting PLD (proven)" in [ln.get_label() for ln in ax.get_lines()]
