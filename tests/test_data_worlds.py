"""The synthetic generator's worlds (fedrg/data/worlds.py): the shifted hospital world differs
from the public one along every axis, measured on the files it writes; both are deterministic;
the public world is byte-for-byte what it was before worlds existed; the settings that choose
a world refuse bad values and never reach the public pre-training cohorts."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import DataConfig, load_config
from fedrg.data.genomics import PUBLIC_EXPRESSION_CENTRE, PUBLIC_SEED, read_variants
from fedrg.data.images import read_image
from fedrg.data.synth import expression_row, gene_baselines, simulate_hospital, site_batch, synthesize
from fedrg.data.worlds import PUBLIC_WORLD, SHIFTED_WORLD
from fedrg.errors import ConfigError

runner = CliRunner()
HOSPITALS = (1, 2, 3)
OEDEMA_GRADE = {"none": 0, "mild": 1, "moderate": 2, "marked": 3}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    """3 x 60 patients, seed 0, in each world; the shifted one through ``fedrg synth --world``."""
    out = tmp_path_factory.mktemp("worlds")
    synthesize(out / PUBLIC_WORLD, hospitals=3, patients=60, seed=0)
    res = runner.invoke(app, ["synth", "--out", str(out / SHIFTED_WORLD), "--hospitals", "3",
                              "--patients", "60", "--seed", "0", "--world", "shifted"])
    assert res.exit_code == 0, res.output
    assert "shifted world" in res.output
    return {w: out / w for w in (PUBLIC_WORLD, SHIFTED_WORLD)}


def _rows(hospital: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((hospital / "manifest.csv").read_text())))


def _image_stats(volume: np.ndarray) -> tuple[float, float]:
    """(background noise / intensity range, sharpness of the head's edge in [0, 1])."""
    v = volume.astype(np.float64)
    lo, hi = np.percentile(v, [0.5, 99.5])
    corners = np.concatenate([v[:, :5, :5].ravel(), v[:, :5, -5:].ravel(),
                              v[:, -5:, :5].ravel(), v[:, -5:, -5:].ravel()])
    profile = v[v.shape[0] // 2, 24:41, :20].mean(0)  # the left edge of the head, 17 rows
    profile = (profile - profile.min()) / (profile.max() - profile.min())
    return float(corners.std() / (hi - lo)), float(np.abs(np.diff(profile)).max())


def _image_summary(root: Path) -> tuple[float, float]:
    noise, edge = [], []
    for h in HOSPITALS:
        d = root / f"hospital-{h}"
        for row in _rows(d)[:15]:
            n, e = _image_stats(read_image(d / row["image"]))
            noise.append(n)
            edge.append(e)
    return float(np.mean(noise)), float(np.mean(edge))


def _log_expression(hospital: Path) -> tuple[list[str], list[str], np.ndarray]:
    lines = (hospital / "genomics" / "expression.tsv").read_text().splitlines()
    genes = lines[0].split("\t")[1:]
    ids = [line.split("\t")[0] for line in lines[1:]]
    values = np.array([[float(v) for v in line.split("\t")[1:]] for line in lines[1:]])
    return genes, ids, np.log1p(values)


def test_shifted_scanner_has_lower_resolution_and_more_noise(worlds):
    """Scanner and sequence: blur (thicker slices, smaller matrices) softens the head's edge;
    lower signal-to-noise raises the background noise relative to the intensity range."""
    pub_noise, pub_edge = _image_summary(worlds[PUBLIC_WORLD])
    sh_noise, sh_edge = _image_summary(worlds[SHIFTED_WORLD])
    assert pub_edge > 0.85 and sh_edge < 0.7, (pub_edge, sh_edge)
    assert sh_noise > 1.4 * pub_noise, (pub_noise, sh_noise)


def test_shifted_expression_platform_compresses_and_shifts(worlds):
    """Expression platform and batch: a compressed dynamic range (smaller spread within a
    hospital), larger per-site per-gene batch shifts, and levels far from the public
    normalisation constants (gene-specific platform bias)."""
    stats = {}
    for world, root in worlds.items():
        means, sds = [], []
        for h in HOSPITALS:
            genes, _, x = _log_expression(root / f"hospital-{h}")
            means.append(x.mean(0))
            sds.append(x.std(0, ddof=1))
        m = np.array(means)
        centred = m - m.mean(0)
        batch = centred - centred.mean(1, keepdims=True)  # per-gene site offsets, library removed
        public_centre = np.array([PUBLIC_EXPRESSION_CENTRE[g] for g in genes])
        stats[world] = (float(np.mean(sds)), float(batch.std(ddof=1)),
                        float(np.abs(m - public_centre).mean()))
    (pub_sd, pub_batch, pub_off), (sh_sd, sh_batch, sh_off) = stats[PUBLIC_WORLD], stats[SHIFTED_WORLD]
    assert sh_sd < 0.8 * pub_sd, stats
    assert sh_batch > 1.5 * pub_batch, stats
    assert sh_off > pub_off + 0.2, stats


def test_shifted_case_mix(worlds):
    """Case mix: more IDH-mutant tumours, and more of them MGMT-methylated (TCGA/G-CIMP-like)."""
    out = {}
    for world, root in worlds.items():
        rows = [r for h in HOSPITALS for r in _rows(root / f"hospital-{h}")]
        idh = [int(r["idh_mutant"]) for r in rows if r["idh_mutant"]]
        mgmt_mut = [int(r["mgmt_methylated"]) for r in rows
                    if r["idh_mutant"] == "1" and r["mgmt_methylated"]]
        out[world] = (float(np.mean(idh)), float(np.mean(mgmt_mut)))
    assert out[SHIFTED_WORLD][0] > out[PUBLIC_WORLD][0] + 0.08, out
    assert out[SHIFTED_WORLD][1] > out[PUBLIC_WORLD][1] + 0.05, out


def test_phenotype_associations_only_in_the_shifted_world():
    """Image associations the public world lacks or holds weakly, on the phenotype the renderer
    draws and the reports describe (2,400 simulated patients per world, no files: the effects
    are a few tenths of a grade, too small to read reliably from 180 written reports):
    among IDH-wildtype tumours MGMT-methylated ones have less oedema and less enhancement, and
    oligodendrogliomas calcify far more often than astrocytomas."""
    enhancement = {"none": 0, "minimal": 1, "patchy": 2, "ring": 3}
    out = {}
    for world in (PUBLIC_WORLD, SHIFTED_WORLD):
        patients = [p for h in range(1, 17) for p in simulate_hospital(3, h, 150, world)[1]]
        wt = [p for p in patients if not p.idh]
        assert sum(p.mgmt for p in wt) > 300 and sum(not p.mgmt for p in wt) > 300

        def methylated_minus_not(grade, group=wt):
            return float(np.mean([grade(p) for p in group if p.mgmt])
                         - np.mean([grade(p) for p in group if not p.mgmt]))

        oligo = [p.findings.calcification for p in patients if p.codel]
        astro = [p.findings.calcification for p in patients if p.idh and not p.codel]
        out[world] = (methylated_minus_not(lambda p: OEDEMA_GRADE[p.findings.oedema]),
                      methylated_minus_not(lambda p: enhancement[p.findings.enhancement]),
                      float(np.mean(oligo) - np.mean(astro)))
    pub, sh = out[PUBLIC_WORLD], out[SHIFTED_WORLD]
    assert abs(pub[0]) < 0.1 and abs(pub[1]) < 0.1, out  # absent in the public world
    assert sh[0] < -0.25 and sh[1] < -0.2, out
    assert pub[2] < 0.12 and sh[2] > 0.25, out  # weak in the public world, strong when shifted


def test_shifted_variant_calls_germline_and_unsequenced(worlds):
    """The shifted sites' tumour-only panel reports common germline polymorphisms (IDH1 G105G
    at chr2:208248468, TERT -245T>C at chr5:1295234) as variants of their genes, so IDH1 and
    TERT indicators lose their meaning, and sequences only part of the patients (the rest are
    ./. in every record)."""
    cfg = DataConfig()
    j_idh1, j_tert = cfg.mutation_genes.index("IDH1"), cfg.mutation_genes.index("TERT")
    out = {}
    for world, root in worlds.items():
        wt_idh1, astro_tert, g105g, tert245, sequenced, n = [], [], 0, 0, 0, 0
        for h in HOSPITALS:
            d = root / f"hospital-{h}"
            vcf = d / "genomics" / "variants.vcf"
            problems: list = []
            calls = read_variants(vcf, cfg.mutation_genes, problems=problems)
            assert calls is not None and not problems
            idx = {s: i for i, s in enumerate(calls.samples)}
            records = {(f[0], int(f[1])): f[9:] for f in (line.split("\t") for line in
                       vcf.read_text().splitlines() if line and not line.startswith("#"))}
            for r in _rows(d):
                i = idx[r["patient_id"]]
                n += 1
                if all(rec[i].startswith("./.") for rec in records.values()):
                    continue  # not sequenced
                sequenced += 1
                g105g += not records.get(("chr2", 208248468), ["0/0"] * (i + 1))[i].startswith("0/0")
                tert245 += not records.get(("chr5", 1295234), ["0/0"] * (i + 1))[i].startswith("0/0")
                if r["idh_mutant"] == "0":
                    wt_idh1.append(calls.indicators[i, j_idh1])
                if r["idh_mutant"] == "1" and r["codeletion_1p19q"] == "0":
                    astro_tert.append(calls.indicators[i, j_tert])
        out[world] = {"germline IDH1": g105g / sequenced, "germline TERT": tert245 / sequenced,
                      "IDH1 in wildtype": float(np.mean(wt_idh1)),
                      "TERT in astrocytoma": float(np.mean(astro_tert)),
                      "unsequenced": 1 - sequenced / n}
    pub, sh = out[PUBLIC_WORLD], out[SHIFTED_WORLD]
    assert pub["germline IDH1"] == pub["germline TERT"] == pub["unsequenced"] == 0.0, out
    assert 0.04 < sh["germline IDH1"] < 0.2 and 0.3 < sh["germline TERT"] < 0.7, out
    assert sh["IDH1 in wildtype"] > pub["IDH1 in wildtype"], out
    assert pub["TERT in astrocytoma"] < 0.2 and sh["TERT in astrocytoma"] > 0.35, out
    assert 0.4 < sh["unsequenced"] < 0.95, out


def test_plus7_minus10_lowers_mgmt_expression_in_wildtype_only_when_shifted():
    """An expression association the public world lacks: +7/-10 (chromosome 10 loss) lowers
    MGMT expression in IDH-wildtype tumours whatever their methylation, so unmethylated
    wildtype tumours read lower than unmethylated IDH-mutant ones."""
    genes = ["MGMT", "PTEN", "EGFR", "ACTB"]
    diff = {}
    for world in (PUBLIC_WORLD, SHIFTED_WORLD):
        groups: dict[tuple[bool, str], list[float]] = {}
        for h in range(1, 17):
            profile, patients = simulate_hospital(3, h, 150, world)
            baselines = gene_baselines(sorted(genes))
            batch = site_batch(3, h, sorted(genes), world)
            for i, p in enumerate(patients):
                row = expression_row(p, profile, genes, baselines, batch,
                                     np.random.default_rng([3, h, i, 4]))
                if not p.mgmt:
                    log = np.log1p(row)
                    # MGMT relative to a housekeeping gene: the site's library and batch cancel
                    groups.setdefault((p.idh, "MGMT"), []).append(log[0] - log[3] - batch["MGMT"]
                                                                  + batch["ACTB"])
        diff[world] = float(np.mean(groups[(False, "MGMT")]) - np.mean(groups[(True, "MGMT")]))
    assert abs(diff[PUBLIC_WORLD]) < 0.12, diff
    assert diff[SHIFTED_WORLD] < -0.2, diff


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shifted_world_is_deterministic(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(tmp_path / name, hospitals=2, patients=8, seed=seed, world=SHIFTED_WORLD)
    synthesize(tmp_path / "p", hospitals=2, patients=8, seed=5, world=PUBLIC_WORLD)
    a, b, c, p = (_digest(tmp_path / n) for n in ("a", "b", "c", "p"))
    assert a == b and len(a) > 20
    assert a["hospital-1/manifest.csv"] != c["hospital-1/manifest.csv"]
    assert a["hospital-1/genomics/expression.tsv"] != p["hospital-1/genomics/expression.tsv"]


#: sha256 over (path, bytes) of the manifests, expression tables and VCFs of
#: ``synthesize(hospitals=2, patients=10, seed=7)``, measured with the generator before worlds
#: existed (main at 2f5b27c): the public world must stay byte-identical, so the public adapter
#: cache (keyed by GENERATOR_VERSION) stays valid.
PUBLIC_TEXT_DIGEST = "a6c9fcd9db4ddcd1fb9c6f6387db567009fe6d10d4c8c5e90dd31fdc6ddfb1cc"


def test_public_world_is_unchanged(tmp_path):
    synthesize(tmp_path, hospitals=2, patients=10, seed=7)
    h = hashlib.sha256()
    for f in sorted(tmp_path.rglob("*")):
        if f.name in ("manifest.csv", "expression.tsv", "variants.vcf"):
            h.update(str(f.relative_to(tmp_path)).encode())
            h.update(f.read_bytes())
    assert h.hexdigest() == PUBLIC_TEXT_DIGEST


def test_cli_shifted_cohort_validates(worlds):
    for h in HOSPITALS:
        res = runner.invoke(app, ["validate", str(worlds[SHIFTED_WORLD] / f"hospital-{h}")])
        assert res.exit_code == 0, res.output
        assert "cohort is valid" in res.output


def test_bad_world_values_are_refused(tmp_path):
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--hospitals", "1",
                              "--patients", "8", "--world", "mars"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "--world='mars'" in text and "'public', 'shifted'" in text
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "y"), "--hospitals", "1",
                              "--patients", "8", "--set", "data.world=Shifted"])
    assert res.exit_code == 2
    assert "data.world" in res.output and "'Shifted'" in res.output and "'shifted'" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match=r"world='moon'.*'public', 'shifted'"):
        synthesize(tmp_path / "z", hospitals=1, patients=8, seed=0, world="moon")
    res = runner.invoke(app, ["simulate", "--set", "data.world=mars", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "data.world" in res.output and "'mars'" in res.output
    assert not (tmp_path / "run").exists()


def test_cohort_cache_is_keyed_by_world(monkeypatch, tmp_path):
    from fedrg.commands.federation import synthetic_cohort_root
    from fedrg.data.synth import GENERATOR_VERSION

    monkeypatch.setenv("FEDRG_CACHE", str(tmp_path))
    public = synthetic_cohort_root(load_config(None, ["data.world=public"]))
    shifted = synthetic_cohort_root(load_config(None, []))  # the default world
    assert public != shifted and public.parent == shifted.parent == tmp_path / "synthetic"
    # the public world keeps the key it had before worlds existed (no rebuild of old caches)
    cfg = load_config(None, ["data.world=public"])
    old_recipe = {"hospitals": cfg.federation.hospitals, "patients": cfg.data.synthetic_patients,
                  "seed": cfg.federation.seed,
                  "data": {k: v for k, v in cfg.data.model_dump(mode="json").items() if k != "world"},
                  "version": GENERATOR_VERSION}
    old = hashlib.sha256(json.dumps(old_recipe, sort_keys=True).encode()).hexdigest()[:16]
    assert public.name == old


def test_public_pretraining_stays_in_the_public_world(tmp_path):
    """data.world chooses the hospitals' world; the public adapter's cohorts and cache key
    ignore it."""
    from fedrg.train.public_init import PublicInitRecipe, _public_dataset, cache_key

    shifted_cfg = DataConfig(world=SHIFTED_WORLD)
    cfg = load_config(None, [])
    assert cache_key(cfg.model, shifted_cfg, training_cfg=cfg.training) == cache_key(
        cfg.model, DataConfig(), training_cfg=cfg.training)
    recipe = PublicInitRecipe(hospitals=1, patients=8)
    dataset = _public_dataset(shifted_cfg, recipe, tmp_path / "pre")
    assert len(dataset) > 0
    synthesize(tmp_path / "ref", hospitals=1, patients=8, seed=PUBLIC_SEED, world=PUBLIC_WORLD)
    for rel in ("hospital-1/manifest.csv", "hospital-1/genomics/expression.tsv",
                "hospital-1/genomics/variants.vcf"):
        assert (tmp_path / "pre" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()
