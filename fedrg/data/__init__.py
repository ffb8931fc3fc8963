"""Hospital cohorts: readers, validation, dataset, synthetic data, report language.

Modules: ``manifest`` (file layout, ``manifest.csv``, the :class:`Cohort` record),
``validate`` (all problems + summary), ``cohort`` (``load_cohort``), ``images`` (pluggable
readers, resampling), ``genomics`` (expression panel, VCF), ``dataset`` (torch Dataset,
collate, split), ``schema`` (the record schema training checks), ``importers`` (GDC + DICOM
-> cohort), ``synth`` (synthetic glioma cohorts), ``reports`` / ``findings`` (report
language and its labeler) (oracle and baseline AUROCs: ``tools/signal_baselines.py``). See docs/cohort-format.md.
"""

from fedrg._exports import lazy_exports

_EXPORTS = {
    "Cohort": "fedrg.data.manifest",
    "load_cohort": "fedrg.data.cohort",
    "validate_cohort": "fedrg.data.validate",
    "CohortDataset": "fedrg.data.dataset",
    "collate_samples": "fedrg.data.dataset",
    "split_indices": "fedrg.data.dataset",
    "RecordSchema": "fedrg.data.schema",
    "RADIOGENOMICS_RECORD": "fedrg.data.schema",
    "register_reader": "fedrg.data.images",
    "synthesize": "fedrg.data.synth",
    "import_gdc": "fedrg.data.importers.build",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
