"""Synthetic glioma radiogenomics cohorts in the real on-disk format.

The generative model (documented with measured AUROCs in docs/cohort-format.md):

1. Each hospital draws a profile: cohort size around the requested mean, marker prevalence
   (IDH-mutant, 1p/19q codeleted among IDH-mutant, MGMT shift), scanner intensity scale /
   offset / contrast (gamma) / noise / bias field, expression batch effects, DICOM share.
2. Each patient draws molecular status (IDH, then 1p/19q codeletion only if IDH-mutant,
   then MGMT with a higher rate in IDH-mutant), age, and an "aggressiveness" latent; the
   visible phenotype follows with overlap: size, lobe, enhancement, necrosis, oedema,
   T2-FLAIR mismatch sign (IDH-mutant astrocytomas), calcification (codeleted), and
   ventricle size (brain atrophy with age).
3. The phenotype is rendered into a 32x64x64 single-channel volume, written as NIfTI
   (.nii.gz) or as a DICOM series; expression modules co-vary with IDH, 1p/19q and MGMT;
   mutation calls (IDH1 R132H ...) go into a multi-sample VCF; the report describes the
   phenotype in the language of :mod:`fedrg.data.reports`.

Everything derives from ``numpy.random.default_rng([seed, hospital, patient, ...])``, and
files carry no timestamps (gzip mtime 0), so one seed gives identical bytes.

``world`` chooses the generator's world (:mod:`fedrg.data.worlds`): ``"public"`` (the public
pre-training cohorts; the output of generator version 2) or ``"shifted"`` (hospitals with
other scanners, another expression platform, another case mix and associations the public
world lacks).
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedrg.config import DEFAULT_GENE_PANEL, DEFAULT_MARKERS, DataConfig
from fedrg.data import worlds
from fedrg.data.reports import Findings, render_report
from fedrg.data.worlds import (
    PUBLIC_WORLD,
    SHIFTED_WORLD,
    Biology,
    SiteShift,
    biology,
    check_world,
    draw_site_shift,
    probe_bias,
)
from fedrg.errors import ConfigError

VOLUME_SHAPE = (32, 64, 64)  # D (inferior->superior), H (anterior->posterior), W (right->left)
SPACING_MM = (4.0, 3.0, 3.0)
_LOBE_CENTRE = {  # (row, lateral offset from midline) in voxels of the axial plane
    "frontal": (14.0, 9.0),
    "temporal": (31.0, 16.0),
    "parietal": (43.0, 11.0),
    "occipital": (52.0, 6.0),
    "insular": (28.0, 10.0),
}
_LOBES = tuple(_LOBE_CENTRE)
_LOBE_P = {  # location given subtype (IDH-mutant tumours favour frontal lobe and insula)
    "wildtype": (0.24, 0.34, 0.24, 0.10, 0.08),
    "astrocytoma": (0.50, 0.18, 0.10, 0.04, 0.18),
    "oligodendroglioma": (0.58, 0.14, 0.10, 0.04, 0.14),
}

# Expression modules: gene -> list of (module, loading).
_MODULES: dict[str, list[tuple[str, float]]] = {
    **{g: [("mes", 1.0)] for g in ("CHI3L1", "VEGFA", "LGALS3", "PDPN", "TIMP1", "SERPINE1",
                                    "CD44", "POSTN")},
    **{g: [("gcimp", 1.0)] for g in ("DLL3", "SOX4", "OLIG2", "BCAN")},
    **{g: [("arm1p", 1.0)] for g in ("CAMTA1", "CHD5", "DFFA", "KIF1B")},
    **{g: [("arm19q", 1.0)] for g in ("CIC", "ZNF420", "BAX", "LIG1")},
    "MGMT": [("mgmt", 1.0)],
    "EBF3": [("mgmt", 0.4)],
    "MKI67": [("prolif", 1.0)],
    "TOP2A": [("prolif", 1.0)],
    "EGFR": [("egfr", 1.0)],
    "PTEN": [("pten", 1.0)],
    "CDKN2A": [("cdkn2a", 1.0)],
    "PDGFRA": [("gcimp", 0.3)],
}

Site = tuple[str, int, str, str, str]
# (chrom, pos, ref, alt, protein change); GRCh38 for IDH1/IDH2/TP53/TERT hotspots,
# representative positions inside the gene for the others.
_SITES: dict[str, list[Site]] = {
    "IDH1": [("chr2", 208248389, "C", "T", "R132H"), ("chr2", 208248390, "G", "A", "R132C")],
    "IDH2": [("chr15", 90088702, "C", "T", "R172K")],
    "TP53": [("chr17", 7673802, "C", "T", "R273H"), ("chr17", 7675088, "C", "T", "R175H"),
             ("chr17", 7674220, "C", "T", "R248Q")],
    "ATRX": [("chrX", 77682471, "G", "A", "R1426*"), ("chrX", 77696650, "C", "T", "Q929*")],
    "TERT": [("chr5", 1295113, "G", "A", "C228T"), ("chr5", 1295135, "G", "A", "C250T")],
    "EGFR": [("chr7", 55152546, "C", "T", "A289V"), ("chr7", 55155011, "G", "T", "G598V")],
    "PTEN": [("chr10", 87933148, "G", "A", "R130Q"), ("chr10", 87957915, "C", "T", "R233*")],
    "CIC": [("chr19", 42295000, "C", "T", "R215W"), ("chr19", 42291512, "G", "A", "R1515H")],
    "FUBP1": [("chr1", 77965000, "G", "A", "splice")],
    "NF1": [("chr17", 31200000, "C", "T", "R1362*")],
}
#: Common germline polymorphisms inside the hotspot amplicons (GRCh38), which the shifted
#: world's tumour-only pipeline reports as variants of the gene (docs/cohort-format.md).
_GERMLINE_SITES: dict[str, Site] = {
    "IDH1": ("chr2", 208248468, "G", "A", "G105G"),  # rs11554137, synonymous, c.315C>T
    "TERT": ("chr5", 1295234, "A", "G", "-245T>C"),  # rs2853669, promoter
}
_MUT_P = {  # gene -> P(call) for (wildtype, astrocytoma, oligodendroglioma)
    "TP53": (0.30, 0.85, 0.05),
    "ATRX": (0.06, 0.70, 0.02),
    "TERT": (0.75, 0.05, 0.95),
    "CIC": (0.01, 0.01, 0.60),
    "FUBP1": (0.01, 0.01, 0.30),
    "EGFR": (0.25, 0.01, 0.01),
    "PTEN": (0.30, 0.03, 0.03),
    "NF1": (0.15, 0.05, 0.02),
}
#: Panel genes on chromosome 7 (+1 copy) and 10 (-1 copy) under +7/-10.
_CHROMOSOME_COPIES = {"EGFR": 1, "PTEN": -1, "MGMT": -1, "EBF3": -1}
_CHROM_ORDER = {f"chr{c}": i for i, c in enumerate([*map(str, range(1, 23)), "X", "Y"])}


@dataclass(frozen=True)
class HospitalProfile:
    """Per-hospital parameters (what makes the federation non-IID)."""

    index: int
    n_patients: int
    p_idh: float
    p_codel: float
    mgmt_shift: float
    scale: float
    offset: float
    gamma: float
    noise: float
    bias: float
    dicom_fraction: float
    library: float  # global expression shift (log scale)
    world: str = PUBLIC_WORLD
    site: SiteShift | None = None  # the shifted world's resolution, contrast and platform

    @property
    def biology(self) -> Biology:
        """The associations of this hospital's world."""
        return biology(self.world)


@dataclass(frozen=True)
class Phenotype:
    """The visible phenotype a patient's scan is rendered from: every finding set (a report
    of it, :func:`_reported_findings`, may omit some; :class:`Findings` allows that)."""

    size_cm: float
    side: str
    location: str
    enhancement: str
    necrosis: str
    oedema: str
    mismatch_sign: str
    calcification: bool


@dataclass(frozen=True)
class Patient:
    """Latent truth of one synthetic patient."""

    patient_id: str
    idh: bool
    codel: bool
    mgmt: bool
    age: float
    aggressiveness: float
    findings: Phenotype
    atrophy: float
    heterogeneity: float
    centre: tuple[float, float, float]
    known: tuple[bool, bool, bool]  # idh, codel, mgmt recorded in the manifest

    @property
    def subtype(self) -> str:
        if not self.idh:
            return "wildtype"
        return "oligodendroglioma" if self.codel else "astrocytoma"


def hospital_profile(seed: int, index: int, mean_patients: int,
                     world: str = PUBLIC_WORLD) -> HospitalProfile:
    """Draw hospital ``index`` (1-based) of a federation in ``world``."""
    if check_world(world) == SHIFTED_WORLD:
        return _shifted_profile(seed, index, mean_patients)
    rng = np.random.default_rng([seed, index, 0xC0DE])
    return HospitalProfile(
        index=index,
        n_patients=max(8, round(mean_patients * rng.uniform(0.75, 1.25))),
        p_idh=float(rng.uniform(0.25, 0.55)),
        p_codel=float(rng.uniform(0.3, 0.55)),
        mgmt_shift=float(rng.uniform(-0.08, 0.08)),
        scale=float(rng.uniform(400.0, 1800.0)),
        offset=float(rng.uniform(0.0, 150.0)),
        gamma=float(rng.uniform(0.8, 1.25)),
        noise=float(rng.uniform(0.03, 0.07)),
        bias=float(rng.uniform(0.05, 0.2)),
        dicom_fraction=float(rng.uniform(0.1, 0.3)),
        library=float(rng.normal(0.0, 0.3)),
    )


def _shifted_profile(seed: int, index: int, mean_patients: int) -> HospitalProfile:
    """A hospital of the shifted world (ranges: :data:`fedrg.data.worlds.SHIFTED_RANGES`)."""
    r = worlds.SHIFTED_RANGES
    rng = np.random.default_rng([seed, index, 0x5F1F7])
    n_patients = max(8, round(mean_patients * rng.uniform(0.75, 1.25)))
    p_idh, p_codel, mgmt_shift = r.p_idh.draw(rng), r.p_codel.draw(rng), r.mgmt_shift.draw(rng)
    scale, offset = float(rng.uniform(400.0, 1800.0)), float(rng.uniform(0.0, 150.0))
    gamma = (r.gamma_low if rng.random() < 0.5 else r.gamma_high).draw(rng)
    return HospitalProfile(
        index=index, n_patients=n_patients, p_idh=p_idh, p_codel=p_codel, mgmt_shift=mgmt_shift,
        scale=scale, offset=offset, gamma=gamma, noise=r.noise.draw(rng), bias=r.bias.draw(rng),
        dicom_fraction=float(rng.uniform(0.1, 0.3)), library=float(rng.normal(0.0, r.library)),
        world=SHIFTED_WORLD, site=draw_site_shift(rng, r),
    )


def _category(value: float, cuts: tuple[float, ...], labels: tuple[str, ...]) -> str:
    return labels[int(np.searchsorted(np.asarray(cuts), value))]


def sample_patient(rng: np.random.Generator, profile: HospitalProfile, pid: str) -> Patient:
    """Draw one patient's molecular status and visible phenotype."""
    bio = profile.biology
    idh = bool(rng.random() < profile.p_idh)
    codel = bool(idh and rng.random() < profile.p_codel)
    mgmt = bool(rng.random() < (bio.mgmt_rate_mutant if idh else bio.mgmt_rate_wildtype)
                + profile.mgmt_shift)
    age = float(np.clip(rng.normal(60.0, 12.0) if not idh else rng.normal(42.0, 12.0), 18, 90))
    a = float(rng.normal(0.9 if not idh else -0.5, 1.0))
    sub = "wildtype" if not idh else ("oligodendroglioma" if codel else "astrocytoma")
    size = float(np.clip(np.exp(rng.normal(np.log(4.4 if not idh else 4.0), 0.3)), 1.5, 8.0))
    enhancement = _category(a + bio.mgmt_enhancement * mgmt + rng.normal(0, 0.5), (-0.6, 0.1, 0.75),
                            ("none", "minimal", "patchy", "ring"))
    necrosis = "present" if a + rng.normal(0, 0.6) > 0.6 else "absent"
    oedema = _category(0.7 * a + 0.35 * (size - 4.0) + bio.mgmt_oedema * mgmt + rng.normal(0, 0.6),
                       (-0.6, 0.1, 0.8),
                       ("none", "mild", "moderate", "marked"))
    quiet = enhancement in ("none", "minimal") and necrosis == "absent"
    p_mismatch = {"astrocytoma": 0.4, "oligodendroglioma": 0.04, "wildtype": 0.02}[sub]
    mismatch = "present" if quiet and rng.random() < p_mismatch else "absent"
    if mismatch == "present":
        oedema = "none" if rng.random() < 0.7 else "mild"
    calcification = bool(rng.random() < {"astrocytoma": 0.12,
                                          "oligodendroglioma": bio.calcification_codeleted,
                                          "wildtype": 0.06}[sub])
    lobe = _LOBES[int(rng.choice(len(_LOBES), p=_LOBE_P[sub]))]
    side = "left" if rng.random() < 0.5 else "right"
    row, lateral = _LOBE_CENTRE[lobe]
    sign = 1.0 if side == "left" else -1.0  # columns run right -> left
    centre = (
        VOLUME_SHAPE[0] / 2 + rng.normal(0, 1.0),
        row + rng.normal(0, 2.0),
        VOLUME_SHAPE[2] / 2 + sign * lateral + rng.normal(0, 1.5),
    )
    atrophy = float(np.clip(0.65 + 0.012 * (age - 40.0) + rng.normal(0, 0.15), 0.45, 1.6))
    known = (
        bool(rng.random() > 0.05),
        bool(rng.random() > (0.08 if idh else 0.3)),
        bool(rng.random() > 0.15),
    )
    findings = Phenotype(
        size_cm=round(size, 1), side=side, location=lobe, enhancement=enhancement,
        necrosis=necrosis, oedema=oedema, mismatch_sign=mismatch, calcification=calcification,
    )
    heterogeneity = float(np.clip(rng.normal(0.072 if codel else 0.065, 0.03), 0.01, 0.2))
    return Patient(pid, idh, codel, mgmt, age, a, findings, atrophy, heterogeneity, centre, known)


# --------------------------------------------------------------------------- images

_GRID = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in VOLUME_SHAPE],
                             indexing="ij"))


def _smooth_fields(rng: np.random.Generator, n: int, coarse: tuple[int, int, int]) -> np.ndarray:
    base = torch.from_numpy(rng.standard_normal((1, n, *coarse)).astype(np.float32))
    up = F.interpolate(base, size=VOLUME_SHAPE, mode="trilinear", align_corners=True)
    return up[0].numpy()


def render_volume(patient: Patient, profile: HospitalProfile, rng: np.random.Generator) -> np.ndarray:
    """Render the patient's phenotype as scanner intensities, ``VOLUME_SHAPE`` int16-ready."""
    f = patient.findings
    d, h, w = _GRID
    fields = _smooth_fields(rng, 4, (4, 6, 6))
    texture, irregular, patches, bias = fields
    cz, ch, cw = (s / 2 for s in VOLUME_SHAPE)
    brain_r = np.sqrt(((d - cz) / 13.5) ** 2 + ((h - ch) / 28.0) ** 2 + ((w - cw) / 23.0) ** 2)
    x = np.zeros(VOLUME_SHAPE, np.float32)
    x[(brain_r >= 1.0) & (brain_r < 1.1)] = 0.3  # skull
    x[(brain_r >= 1.1) & (brain_r < 1.16)] = 0.55  # scalp
    brain = brain_r < 1.0
    x[brain] = 0.42 + 0.03 * texture[brain]
    for sgn in (-1.0, 1.0):  # lateral ventricles, larger with atrophy
        vr = np.sqrt(((d - cz) / (4.5 * patient.atrophy)) ** 2 + ((h - 30.0) / (9.0 * patient.atrophy)) ** 2
                     + ((w - cw - sgn * 4.5) / (2.6 * patient.atrophy)) ** 2)
        x[vr < 1.0] = 0.12
    # tumour
    r = float(np.clip(f.size_cm * 10.0 / 2.0 / SPACING_MM[1], 2.0, 13.0))
    tz, th, tw = patient.centre
    rho = np.sqrt(((d - tz) * SPACING_MM[0] / SPACING_MM[1] / r) ** 2 + ((h - th) / r) ** 2
                  + ((w - tw) / r) ** 2)
    rho = rho * (1.0 + 0.12 * irregular)
    oedema_extent = {"none": 0.0, "mild": 0.35, "moderate": 0.7, "marked": 1.1}[f.oedema]
    if oedema_extent > 0:
        o = np.clip((1.0 + oedema_extent - rho) / 0.3, 0.0, 1.0) * brain
        x += 0.22 * o
    core = (rho < 1.0) & brain
    hetero = patient.heterogeneity
    if f.mismatch_sign == "present":
        x[core] = 0.5 + hetero * texture[core]
        x[core & (rho > 0.86)] += 0.3
    else:
        x[core] = 0.72 + hetero * texture[core]
    enh = {"none": 0.0, "minimal": 0.08, "patchy": 0.28, "ring": 0.38}[f.enhancement]
    if enh > 0:
        rim = core & (rho > 0.72)
        if f.enhancement == "patchy":
            x[rim] += (enh * (patches > 0.0).astype(np.float32))[rim]
        else:
            x[rim] += enh
    if f.necrosis == "present":
        x[core & (rho < 0.58)] = 0.22 + 0.03 * texture[core & (rho < 0.58)]
    if f.calcification:
        for _ in range(int(rng.integers(3, 7))):
            off = rng.normal(0, 0.35 * r, 3)
            off[0] = off[0] * SPACING_MM[1] / SPACING_MM[0] * 0.5
            cr = np.sqrt((d - tz - off[0]) ** 2 + (h - th - off[1]) ** 2 + (w - tw - off[2]) ** 2)
            x[(cr < 1.0) & brain] = 0.05
    if profile.site is not None:  # the shifted world's sequence contrast and resolution
        x = _shifted_acquisition(x, brain, profile.site)
    # scanner: bias field, contrast, scale/offset, Rician noise
    y = np.clip(x * (1.0 + profile.bias * bias), 0.0, None) ** profile.gamma
    n1 = rng.standard_normal(VOLUME_SHAPE, dtype=np.float32) * np.float32(profile.noise)
    n2 = rng.standard_normal(VOLUME_SHAPE, dtype=np.float32) * np.float32(profile.noise)
    y = np.sqrt((y + n1) ** 2 + n2**2)
    return np.clip(np.rint(profile.scale * y + profile.offset), 0, 32767).astype(np.int16)


def _shifted_acquisition(x: np.ndarray, brain: np.ndarray, site: SiteShift) -> np.ndarray:
    """Another sequence's lesion contrast (tissue levels pulled towards parenchyma) and
    another resolution (Gaussian partial-volume blur, thicker through-plane)."""
    from scipy.ndimage import gaussian_filter

    parenchyma = np.float32(0.42)
    csf = brain & (x == np.float32(0.12))  # ventricles (untouched by tumour or oedema)
    x = np.where(brain, parenchyma + np.float32(site.lesion_contrast) * (x - parenchyma), x)
    x = np.where(csf, np.float32(site.csf_level), x)
    blurred = gaussian_filter(x.astype(np.float32), sigma=(site.blur_slice, site.blur_inplane,
                                                           site.blur_inplane), mode="nearest")
    return blurred.astype(np.float32)


def write_nifti(volume: np.ndarray, path: Path) -> None:
    """Write a ``(D, H, W)`` LPS-display volume as RAS NIfTI-1, gzip without timestamp."""
    import nibabel as nib

    data = np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0))
    sd, sh, sw = SPACING_MM
    affine = np.diag([sw, sh, sd, 1.0])
    affine[:3, 3] = [-sw * volume.shape[2] / 2, -sh * volume.shape[1] / 2, -sd * volume.shape[0] / 2]
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"fedrg synthetic FLAIR"
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_dicom_series(volume: np.ndarray, folder: Path, *, patient_id: str, seed: int,
                       hospital: int) -> None:
    """Write a ``(D, H, W)`` volume as a DICOM MR series (one file per axial slice)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)

    def uid(*parts: object) -> UID:
        return generate_uid(entropy_srcs=["fedrg", str(seed), str(hospital), patient_id,
                                          *map(str, parts)])

    study, series, frame = uid("study"), uid("series"), uid("frame")
    sd, sh, sw = SPACING_MM
    depth, rows, cols = volume.shape
    x0, y0, z0 = -sw * cols / 2, -sh * rows / 2, -sd * depth / 2
    pixels = volume.astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.Modality = "MR"
    ds.Manufacturer = f"fedrg synthetic scanner {hospital}"
    ds.SeriesDescription = "AX T2 FLAIR POST"
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = f"{sd:g}"
    ds.SpacingBetweenSlices = f"{sd:g}"
    ds.PixelSpacing = [f"{sh:g}", f"{sw:g}"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for k in range(depth):
        sop = uid("slice", k)
        meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.2f}", f"{y0:.2f}", f"{z0 + k * sd:.2f}"]
        ds.SliceLocation = f"{z0 + k * sd:.2f}"
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------- genomics

#: Bumped whenever the generator's output changes (the simulate cache keys on it).
GENERATOR_VERSION = 2


def gene_baselines(genes: list[str]) -> dict[str, float]:
    """Typical log-scale abundance level of each gene: a property of the gene, not of a cohort.

    Drawn once per gene name from a fixed public seed, so every synthetic cohort (any seed,
    any hospital) and the public constants of :mod:`fedrg.data.genomics` share the same
    biology; hospitals differ only by their batch effects and patients. (Until generator
    version 2 the levels were drawn from the cohort seed, which left public normalisation
    constants off by 1-2 log units per gene on other seeds.)
    """
    out = {}
    for g in genes:
        r = np.random.default_rng([0xBA5E, *g.encode()])
        out[g] = float(r.uniform(1.5, 6.0))
    return out


def expression_row(patient: Patient, profile: HospitalProfile, genes: list[str],
                   baselines: dict[str, float], batch: dict[str, float],
                   rng: np.random.Generator) -> list[float]:
    """Abundances (TPM-like, non-negative) of ``genes`` for one patient."""
    wt = 0.0 if patient.idh else 1.0
    a = patient.aggressiveness
    bio = profile.biology
    egfr_amp = (not patient.idh) and rng.random() < 0.4
    cdkn2a_del = rng.random() < (0.5 if not patient.idh else 0.1)
    partial_1p = (not patient.codel) and rng.random() < 0.1
    module = {
        "mes": 1.1 * wt + 0.3 * a + rng.normal(0, 0.75),
        "gcimp": 1.1 * (1 - wt) + rng.normal(0, 0.75),
        "arm1p": -0.45 * patient.codel - 0.3 * partial_1p,
        "arm19q": -0.45 * patient.codel,
        "mgmt": bio.mgmt_expression * patient.mgmt + rng.normal(0, 0.3),
        "prolif": 0.5 * a + rng.normal(0, 0.5),
        "egfr": 0.6 * wt + 1.8 * egfr_amp,
        "pten": -0.3 * wt,
        "cdkn2a": -1.5 * cdkn2a_del,
    }
    out = []
    site = profile.site
    if site is not None:  # +7/-10: whole-chromosome gain of 7 and loss of 10 (IDH-wildtype)
        plus7minus10 = (not patient.idh) and rng.random() < bio.plus7_minus10_wildtype
    for g in genes:
        if site is not None:  # the shifted platform reads the true level, then batch effects
            true = baselines[g] + rng.normal(0, 0.5)
            for name, loading in _MODULES.get(g, []):
                true += loading * module[name]
            if plus7minus10 and g in _CHROMOSOME_COPIES:
                true += bio.copy_change(_CHROMOSOME_COPIES[g])
            v = site.measure_expression(true) + batch[g] + profile.library
            out.append(round(float(max(np.expm1(v), 0.0)), 3))
            continue
        v = baselines[g] + batch[g] + profile.library + rng.normal(0, 0.5)
        for name, loading in _MODULES.get(g, []):
            v += loading * module[name]
        out.append(round(float(max(np.expm1(v), 0.0)), 3))
    return out


def site_batch(seed: int, index: int, genes: list[str], world: str = PUBLIC_WORLD) -> dict[str, float]:
    """Hospital ``index``'s per-gene expression offsets (log scale): batch effects, plus in the
    shifted world the platform's gene-specific bias."""
    brng = np.random.default_rng([seed, index, 0xBA7C])
    if check_world(world) == SHIFTED_WORLD:
        probe = probe_bias(genes, worlds.SHIFTED_RANGES)
        return {g: probe[g] + float(brng.normal(0, worlds.SHIFTED_RANGES.batch)) for g in genes}
    return {g: float(brng.normal(0, 0.15)) for g in genes}


def _variant_calls(patient: Patient, rng: np.random.Generator,
                   germline: tuple[tuple[str, float], ...] = ()) -> list[tuple[str, Site]]:
    """(gene, site) pairs called in this patient; ``germline`` (gene, carrier rate) pairs add
    the polymorphisms of :data:`_GERMLINE_SITES` that a tumour-only pipeline reports."""
    calls: list[tuple[str, Site]] = []
    if patient.idh:
        u = rng.random()
        if u < 0.85:
            calls.append(("IDH1", _SITES["IDH1"][0]))
        elif u < 0.90:
            calls.append(("IDH1", _SITES["IDH1"][1]))
        elif u < 0.95:
            calls.append(("IDH2", _SITES["IDH2"][0]))
        # else: not detected (low tumour purity)
    elif rng.random() < 0.005:
        calls.append(("IDH1", _SITES["IDH1"][0]))  # false positive call
    col = {"wildtype": 0, "astrocytoma": 1, "oligodendroglioma": 2}[patient.subtype]
    for gene, probs in _MUT_P.items():
        if rng.random() < probs[col]:
            calls.append((gene, _SITES[gene][int(rng.integers(len(_SITES[gene])))]))
    for gene, rate in germline:  # inherited, so independent of the tumour
        if rng.random() < rate:
            calls.append((gene, _GERMLINE_SITES[gene]))
    return calls


def write_vcf(path: Path, patient_ids: list[str], calls: list[list[tuple[str, Site]]],
              rng: np.random.Generator, unsequenced: frozenset[int] = frozenset()) -> None:
    """Multi-sample VCF 4.2 with GT:DP per sample, a few no-calls and LowQual records;
    patients at positions ``unsequenced`` are ``./.`` in every record."""
    sites: dict[tuple[str, Site], dict[int, str]] = {}
    for i, pc in enumerate(calls):
        for gene, site in pc:
            sites.setdefault((gene, site), {})[i] = "0/1" if rng.random() < 0.9 else "1/1"
    lowqual: list[tuple[str, Site, int]] = []
    for i in range(len(patient_ids)):
        if i not in unsequenced and rng.random() < 0.05:  # artefact, filtered by the caller
            gene = list(_SITES)[int(rng.integers(len(_SITES)))]
            lowqual.append((gene, _SITES[gene][int(rng.integers(len(_SITES[gene])))], i))
    records: list[tuple[str, Site, str, dict[int, str]]] = []
    for (gene, site), carriers in sites.items():
        records.append((gene, site, "PASS", carriers))
    for gene, site, i in lowqual:
        records.append((gene, site, "LowQual", {i: "0/1"}))
    records.sort(key=lambda r: (_CHROM_ORDER[r[1][0]], r[1][1], r[2]))
    lines = [
        "##fileformat=VCFv4.2",
        "##source=fedrg-synth",
        "##reference=GRCh38",
        '##INFO=<ID=GENE,Number=1,Type=String,Description="Gene symbol">',
        '##INFO=<ID=AA,Number=1,Type=String,Description="Protein change">',
        '##FILTER=<ID=LowQual,Description="Low quality call">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Read depth">',
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT",
                   *patient_ids]),
    ]
    for gene, (chrom, pos, ref, alt, aa), flt, carriers in records:
        qual = "60" if flt == "PASS" else "8"
        samples = []
        for i in range(len(patient_ids)):
            dp = int(rng.integers(20, 200))
            if i in unsequenced:
                samples.append("./.:0")
            elif i in carriers:
                samples.append(f"{carriers[i]}:{dp}")
            elif rng.random() < 0.02:
                samples.append("./.:0")
            else:
                samples.append(f"0/0:{dp}")
        lines.append("\t".join([chrom, str(pos), ".", ref, alt, qual, flt,
                                f"GENE={gene};AA={aa}", "GT:DP", *samples]))
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- reports

def _reported_findings(patient: Patient, rng: np.random.Generator) -> Findings:
    """What the radiologist writes: the phenotype, sometimes one grade off, sometimes omitted."""
    f = patient.findings

    def blur(value: str, labels: tuple[str, ...], p: float = 0.06) -> str:
        i = labels.index(value)
        if rng.random() < p:
            i = int(np.clip(i + (1 if rng.random() < 0.5 else -1), 0, len(labels) - 1))
        return labels[i]

    def keep(value, p: float = 0.92):
        return value if rng.random() < p else None

    molecular = rng.random() < 0.4
    return Findings(
        size_cm=keep(round(float(f.size_cm + rng.normal(0, 0.2)), 1), 0.95),
        side=f.side,
        location=keep(f.location, 0.97),
        enhancement=keep(blur(f.enhancement, ("none", "minimal", "patchy", "ring"))),
        necrosis=keep(f.necrosis),
        oedema=keep(blur(f.oedema, ("none", "mild", "moderate", "marked"))),
        mismatch_sign=keep(f.mismatch_sign, 0.8 if f.mismatch_sign == "absent" else 0.95),
        calcification=f.calcification and rng.random() < 0.8,
        idh=("mutant" if patient.idh else "wildtype") if molecular and patient.known[0] else None,
        codeletion=("codeleted" if patient.codel else "intact")
        if molecular and patient.known[1] else None,
        mgmt=("methylated" if patient.mgmt else "unmethylated")
        if molecular and patient.known[2] else None,
    )


# --------------------------------------------------------------------------- cohorts

def simulate_hospital(seed: int, index: int, mean_patients: int,
                      world: str = PUBLIC_WORLD) -> tuple[HospitalProfile, list[Patient]]:
    """The latent truth of hospital ``index`` in ``world`` (what :func:`synthesize` writes)."""
    profile = hospital_profile(seed, index, mean_patients, world)
    patients = [
        sample_patient(np.random.default_rng([seed, index, i, 1]), profile, f"h{index}-p{i + 1:04d}")
        for i in range(profile.n_patients)
    ]
    return profile, patients


def _marker_value(patient: Patient, name: str) -> str:
    k = DEFAULT_MARKERS.index(name)
    if not patient.known[k]:
        return ""
    return str(int((patient.idh, patient.codel, patient.mgmt)[k]))


def write_hospital(out: Path, seed: int, index: int, mean_patients: int,
                   data_cfg: DataConfig, world: str | None = None) -> Path:
    """Write one hospital's cohort directory (``world``: default ``data_cfg.world``); returns it."""
    world = check_world(data_cfg.world if world is None else world)
    unknown = [m for m in data_cfg.markers if m not in DEFAULT_MARKERS]
    if unknown:
        raise ConfigError(
            f"data.markers contains {unknown}; the synthetic generator knows only "
            f"{DEFAULT_MARKERS}"
        )
    profile, patients = simulate_hospital(seed, index, mean_patients, world)
    root = out / f"hospital-{index}"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "genomics").mkdir(exist_ok=True)
    genes = list(data_cfg.gene_panel)
    baselines = gene_baselines(sorted(set(genes) | set(DEFAULT_GENE_PANEL)))
    batch = site_batch(seed, index, sorted(baselines), world)
    rows: list[list[str]] = []
    expr: list[tuple[str, list[float]]] = []
    calls: list[list[tuple[str, Site]]] = []
    unsequenced: set[int] = set()
    n_dicom = 0
    for i, p in enumerate(patients):
        prng = np.random.default_rng([seed, index, i, 2])
        volume = render_volume(p, profile, prng)
        use_dicom = prng.random() < profile.dicom_fraction or (i == len(patients) - 1 and not n_dicom)
        if use_dicom:
            n_dicom += 1
            rel = f"images/{p.patient_id}"
            write_dicom_series(volume, root / rel, patient_id=p.patient_id, seed=seed, hospital=index)
        else:
            rel = f"images/{p.patient_id}.nii.gz"
            write_nifti(volume, root / rel)
        rrng = np.random.default_rng([seed, index, i, 3])
        report = "" if rrng.random() < 0.05 else render_report(_reported_findings(p, rrng), rrng)
        rows.append([p.patient_id, rel, report, *(_marker_value(p, m) for m in data_cfg.markers)])
        grng = np.random.default_rng([seed, index, i, 4])
        expr.append((p.patient_id, expression_row(p, profile, genes, baselines, batch, grng)))
        if profile.site is not None:
            calls.append(_variant_calls(p, grng, profile.site.germline))
            if grng.random() >= profile.site.sequenced:  # no panel sequencing for this patient
                unsequenced.add(i)
                calls[-1] = []
        else:
            calls.append(_variant_calls(p, grng))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_id", "image", "report", *data_cfg.markers])
    w.writerows(rows)
    (root / "manifest.csv").write_text(buf.getvalue())
    lines = ["\t".join(["patient_id", *genes])]
    lines += ["\t".join([pid, *(f"{v:.3f}" for v in values)]) for pid, values in expr]
    (root / "genomics" / "expression.tsv").write_text("\n".join(lines) + "\n")
    write_vcf(root / "genomics" / "variants.vcf", [p.patient_id for p in patients], calls,
              np.random.default_rng([seed, index, 0x7CF]), frozenset(unsequenced))
    return root


def synthesize(out_dir: str | Path, *, hospitals: int, patients: int, seed: int,
               data_cfg: DataConfig | None = None, world: str | None = None) -> list[Path]:
    """Write ``hospitals`` synthetic cohorts to ``out_dir/hospital-1..N``.

    Parameters
    ----------
    out_dir:
        Created if needed; existing hospital folders are overwritten file by file.
    hospitals:
        Number of cohorts (>= 1).
    patients:
        Mean cohort size (each hospital draws 0.75x-1.25x, at least 8).
    seed:
        Same seed, same bytes.
    data_cfg:
        Markers, gene panel, world (defaults if ``None``).
    world:
        ``"public"`` or ``"shifted"`` (:mod:`fedrg.data.worlds`); ``None`` = the public world
        (the generator's own; ``fedrg simulate`` and ``fedrg synth`` pass ``data.world``).

    Returns
    -------
    list[Path]
        The hospital directories in order.
    """
    if hospitals < 1 or patients < 1:
        raise ConfigError(f"synthesize needs hospitals >= 1 and patients >= 1 (got {hospitals}, {patients})")
    cfg = data_cfg or DataConfig()
    world = check_world(PUBLIC_WORLD if world is None else world, setting="world")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        return [write_hospital(out, seed, h, patients, cfg, world) for h in range(1, hospitals + 1)]
