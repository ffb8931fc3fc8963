"""Hospital cohorts: readers, validation, dataset, synthetic data, report language.

Modules: ``cohort`` (manifest + :class:`~fedrg.data.cohort.Cohort`, ``load_cohort``),
``images`` (pluggable readers, resampling), ``genomics`` (expression panel, VCF),
``validate`` (all problems + summary), ``dataset`` (torch Dataset, collate, split),
``synth`` (synthetic glioma cohorts), ``reports`` / ``findings`` (report language and its
labeler), ``signal`` (oracle and baseline AUROCs). See docs/cohort-format.md.
"""
