"""A small GDC-style download and a TCIA-style DICOM folder, in the published formats.

Expression: GDC *STAR - Counts* files (``# gene-model`` comment, ``gene_id gene_name
gene_type unstranded stranded_first stranded_second tpm_unstranded fpkm_unstranded
fpkm_uq_unstranded``, four ``N_*`` rows), one per file-UUID folder as ``gdc-client``
writes them, linked to cases by the cart's sample sheet. Mutations: a gzipped masked
somatic MAF with the ``#version gdc-1.0.0`` header. Clinical: ``clinical.tsv`` with several
rows per case and ``'--`` for empty values. DICOM: pydicom's bundled MR_small/CT_small,
re-written with new PatientID / series / instance UIDs.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

from fedrg.config import DataConfig

CASES = {  # submitter id -> GDC case UUID
    "TCGA-AA-0001": "0a1b2c3d-0000-4000-8000-000000000001",
    "TCGA-AA-0002": "0a1b2c3d-0000-4000-8000-000000000002",
    "TCGA-AA-0003": "0a1b2c3d-0000-4000-8000-000000000003",
}
STAR_HEADER = ["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first",
               "stranded_second", "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"]
MAF_HEADER = [
    "Hugo_Symbol", "Entrez_Gene_Id", "Center", "NCBI_Build", "Chromosome", "Start_Position",
    "End_Position", "Strand", "Variant_Classification", "Variant_Type", "Reference_Allele",
    "Tumor_Seq_Allele1", "Tumor_Seq_Allele2", "dbSNP_RS", "dbSNP_Val_Status",
    "Tumor_Sample_Barcode", "Matched_Norm_Sample_Barcode", "HGVSc", "HGVSp", "HGVSp_Short",
    "Transcript_ID", "t_depth", "t_ref_count", "t_alt_count", "case_id", "FILTER",
]


def _uuid(text: str) -> str:
    h = hashlib.sha256(text.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def star_counts(values: dict[str, float], *, drop_column: str | None = None, bad: str | None = None) -> str:
    header = [c for c in STAR_HEADER if c != drop_column]
    lines = ["# gene-model: GENCODE v36", "\t".join(header)]
    for name in ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"):
        row = {"gene_id": name, "gene_name": "", "gene_type": "", "unstranded": "1204",
               "stranded_first": "1204", "stranded_second": "1204", "tpm_unstranded": "",
               "fpkm_unstranded": "", "fpkm_uq_unstranded": ""}
        lines.append("\t".join(row[c] for c in header))
    for k, (gene, tpm) in enumerate(values.items()):
        counts = round(tpm * 12.5)
        row = {"gene_id": f"ENSG{k + 1:011d}.{k % 9 + 1}", "gene_name": gene,
               "gene_type": "protein_coding", "unstranded": str(counts),
               "stranded_first": str(counts // 2), "stranded_second": str(counts - counts // 2),
               "tpm_unstranded": bad if bad and gene == "EGFR" else f"{tpm:.4f}",
               "fpkm_unstranded": f"{tpm * 0.4:.4f}", "fpkm_uq_unstranded": f"{tpm * 0.9:.4f}"}
        lines.append("\t".join(row[c] for c in header))
    return "\n".join(lines) + "\n"


def _maf_row(gene, chrom, pos, vc, vtype, ref, alt, case, hgvsp="") -> list[str]:
    barcode = f"{case}-01A-11D-A000-08"
    return [gene, "0", "BI", "GRCh38", chrom, str(pos), str(pos + max(len(ref), 1) - 1), "+", vc,
            vtype, ref, ref, alt, "novel", "", barcode, f"{case}-10A-01D-A000-08", "", "", hgvsp,
            "ENST00000000000", "120", "70", "50", CASES[case], "PASS"]


#: The sample-sheet columns that say what a sample is: the older GDC portal's one column,
#: and the current portal's four (its ``sample`` properties; no ``Sample Type``).
SAMPLE_COLUMNS = {"old": ["Sample Type"],
                  "new": ["Tissue Type", "Tumor Descriptor", "Specimen Type", "Preservation Method"]}
#: One sample in both layouts, as the GDC writes it.
SAMPLE_KINDS = {
    "primary": {"old": ["Primary Tumor"], "new": ["Tumor", "Primary", "Solid Tissue", "Frozen"]},
    "normal": {"old": ["Solid Tissue Normal"],
               "new": ["Normal", "Not Applicable", "Solid Tissue", "Frozen"]},
    "recurrence": {"old": ["Recurrent Tumor"],
                   "new": ["Tumor", "Recurrence", "Solid Tissue", "Frozen"]},
}


def _sample_fields(kinds: list[str], layout: str) -> list[str]:
    """The sheet's per-sample columns for a file of ``kinds`` (comma-separated when several)."""
    per_sample = [SAMPLE_KINDS[k][layout] for k in kinds]
    return [", ".join(vals) for vals in zip(*per_sample, strict=True)]


def write_gdc_download(root: Path, data_cfg: DataConfig, *, start_position: str | None = None,
                       clinical_mgmt: dict[str, str] | None = None, layout: str = "old",
                       recurrence: bool = False) -> Path:
    """Write the download under ``root/gdc`` and return it.

    ``layout`` is the sample sheet's: ``"old"`` (``Sample Type``) or ``"new"`` (the current
    portal's ``Tissue Type``, ``Tumor Descriptor``, ``Specimen Type``, ``Preservation
    Method``). ``recurrence`` adds a recurrent-tumour expression file for TCGA-AA-0002.
    """
    gdc = Path(root) / "gdc"
    gdc.mkdir(parents=True)
    sheet = ["\t".join(["File ID", "File Name", "Data Category", "Data Type", "Project ID",
                        "Case ID", "Sample ID", *SAMPLE_COLUMNS[layout]])]
    panel = [*data_cfg.gene_panel, "TSPAN6", "TNMD"]
    samples = [("TCGA-AA-0001", "01A", "primary"), ("TCGA-AA-0001", "11A", "normal"),
               ("TCGA-AA-0002", "01A", "primary"), ("TCGA-AA-0003", "01A", "primary")]
    if recurrence:
        samples.insert(2, ("TCGA-AA-0002", "02A", "recurrence"))
    for n, (case, code, kind) in enumerate(samples):
        fid = _uuid(f"{case}-{code}")
        name = f"{_uuid(fid)}.rna_seq.augmented_star_gene_counts.tsv"
        (gdc / fid).mkdir()
        values = {g: round(1.0 + 7.3 * ((j * 13 + n * 7) % 17), 4) for j, g in enumerate(panel)}
        (gdc / fid / name).write_text(star_counts(values))
        sheet.append("\t".join([fid, name, "Transcriptome Profiling", "Gene Expression Quantification",
                                "TCGA-LGG", case, f"{case}-{code}", *_sample_fields([kind], layout)]))
    maf_rows = [
        _maf_row("IDH1", "chr2", 208248389, "Missense_Mutation", "SNP", "C", "T", "TCGA-AA-0001", "p.R132H"),
        _maf_row("TP53", "chr17", 7675088, "Missense_Mutation", "SNP", "C", "T", "TCGA-AA-0001", "p.R175H"),
        _maf_row("ATRX", "chrX", 77633124, "Silent", "SNP", "G", "A", "TCGA-AA-0001", "p.="),
        _maf_row("ATRX", "chrX", 77654321, "Frame_Shift_Del", "DEL", "A", "-", "TCGA-AA-0001", "p.K1x"),
        _maf_row("TERT", "chr5", 1295113, "5'Flank", "SNP", "G", "A", "TCGA-AA-0002"),
        _maf_row("EGFR", "chr7", 55191822, "Silent", "SNP", "C", "T", "TCGA-AA-0002", "p.="),
        _maf_row("PTEN", "chr10", 87933147, "Nonsense_Mutation", "SNP", "C", "T", "TCGA-AA-0003", "p.R130*"),
    ]
    if start_position is not None:
        maf_rows[1][5] = start_position
    fid = _uuid("maf")
    (gdc / fid).mkdir()
    maf = gdc / fid / f"{_uuid(fid)}.wxs.aliquot_ensemble_masked.maf.gz"
    text = "#version gdc-1.0.0\n#filedate 20240101\n#annotation.spec gdc-2.0.0-aliquot-merged-masked\n"
    text += "\t".join(MAF_HEADER) + "\n" + "".join("\t".join(r) + "\n" for r in maf_rows)
    maf.write_bytes(gzip.compress(text.encode(), mtime=0))
    sheet.append("\t".join([fid, maf.name, "Simple Nucleotide Variation", "Masked Somatic Mutation",
                            "TCGA-LGG", "TCGA-AA-0001, TCGA-AA-0002, TCGA-AA-0003",
                            "TCGA-AA-0001-01A, TCGA-AA-0002-01A, TCGA-AA-0003-01A",
                            *_sample_fields(["primary"] * 3, layout)]))
    (gdc / "gdc_sample_sheet.2026-11-30.tsv").write_text("\n".join(sheet) + "\n")
    mgmt = {"TCGA-AA-0001": "methylated", "TCGA-AA-0002": "'--", "TCGA-AA-0003": "unmethylated"}
    mgmt.update(clinical_mgmt or {})
    clin = ["\t".join(["case_id", "case_submitter_id", "project_id", "age_at_index", "gender",
                       "primary_diagnosis", "mgmt_status", "treatment_type"])]
    for case, uuid in CASES.items():
        for treatment in ("Radiation Therapy, NOS", "Pharmaceutical Therapy, NOS"):
            clin.append("\t".join([uuid, case, "TCGA-LGG", "41", "female",
                                   "Astrocytoma, anaplastic", mgmt[case], treatment]))
    (gdc / "clinical.tsv").write_text("\n".join(clin) + "\n")
    return gdc


def _write_series(folder: Path, source: str, patient: str, series_uid: str, description: str,
                  slices: int) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file(source))
        ds.PatientID = patient
        ds.PatientName = patient
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        pos = list(ds.ImagePositionPatient)
        ds.ImagePositionPatient = [pos[0], pos[1], float(pos[2]) + 5.0 * k]
        ds.save_as(folder / f"1-{k + 1:02d}.dcm", enforce_file_format=True)


def write_dicom_folder(root: Path) -> Path:
    """TCIA-like ``COLLECTION/PatientID/study/series/1-NN.dcm``: two matched patients (the first
    with a second, shorter series), one patient without a GDC case, and a LICENSE file."""
    d = Path(root) / "dicom"
    base = "1.2.826.0.1.3680043.8.498"
    _write_series(d / "TCGA-LGG/TCGA-AA-0001/study/3.000000-AX FLAIR", "MR_small.dcm",
                  "TCGA-AA-0001", f"{base}.11", "AX FLAIR", 3)
    _write_series(d / "TCGA-LGG/TCGA-AA-0001/study/1.000000-LOC", "CT_small.dcm",
                  "TCGA-AA-0001", f"{base}.12", "LOCALIZER", 1)
    _write_series(d / "TCGA-LGG/TCGA-AA-0002/study/4.000000-FLAIR", "MR_small.dcm",
                  "TCGA-AA-0002", f"{base}.21", "Ax T2 FLAIR", 2)
    _write_series(d / "TCGA-LGG/TCGA-ZZ-9999/study/2.000000-T1", "CT_small.dcm",
                  "TCGA-ZZ-9999", f"{base}.99", "T1 AX", 1)
    (d / "LICENSE").write_text("Creative Commons Attribution 3.0\n")
    return d
