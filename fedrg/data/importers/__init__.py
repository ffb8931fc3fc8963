"""Importers that turn real cohort downloads into fedrg cohorts (docs/cohort-format.md).

``gdc`` reads the GDC's published file formats (STAR - Counts expression quantification,
masked somatic MAF, clinical TSV, sample sheet); ``dicom`` indexes a folder of DICOM
series (a TCIA download); ``build`` matches both by case and writes the cohort, reporting
every case it cannot match.
"""

from fedrg.data.importers.build import ImportReport, import_gdc

__all__ = ["ImportReport", "import_gdc"]
