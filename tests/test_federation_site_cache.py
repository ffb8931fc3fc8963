"""A process keeps at most a bounded number of hospitals (simulations with 100s of them)."""

from __future__ import annotations

from fedrg.config import SiteConfig
from fedrg.hospital import site as site_mod


def _site(tmp_path, i: int) -> SiteConfig:
    return SiteConfig(name=f"h{i}", cohort=str(tmp_path / f"c{i}"), state_dir=str(tmp_path / f"s{i}"))


def test_get_site_reuses_and_evicts_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.setattr(site_mod, "_SITES", type(site_mod._SITES)())
    first = site_mod.get_site(_site(tmp_path, 0))
    assert site_mod.get_site(_site(tmp_path, 0)) is first
    for i in range(1, site_mod._MAX_SITES):
        site_mod.get_site(_site(tmp_path, i))
    site_mod.get_site(_site(tmp_path, 0))  # recently used again: survives the next one
    site_mod.get_site(_site(tmp_path, site_mod._MAX_SITES))
    assert len(site_mod._SITES) == site_mod._MAX_SITES
    assert site_mod.get_site(_site(tmp_path, 0)) is first
    names = [s.site.name for s in site_mod._SITES.values()]
    assert "h1" not in names and "h0" in names
