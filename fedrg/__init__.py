"""fedrg: privacy-preserving federated learning for radiogenomics.

The public API is re-exported here lazily (each name is imported from its module on first
use; ``__all__`` lists them). Importing fedrg (or any of its modules) has no side effects on
the host process: it sets no environment variables and leaves torch's thread count alone.
The ``fedrg`` command and the Flower app modules switch to offline mode themselves
(:mod:`fedrg.runtime`; :func:`fedrg.runtime.offline_env` does the same for one block).
"""

from fedrg._exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # configuration and errors
    "ExperimentConfig": "fedrg.config",
    "FederationConfig": "fedrg.config",
    "DataConfig": "fedrg.config",
    "ModelConfig": "fedrg.config",
    "PrivacyConfig": "fedrg.config",
    "TrainingConfig": "fedrg.config",
    "TrackingConfig": "fedrg.config",
    "SiteConfig": "fedrg.config",
    "SitePolicy": "fedrg.policy",
    "load_config": "fedrg.config",
    "FedrgError": "fedrg.errors",
    "ConfigError": "fedrg.errors",
    "CohortError": "fedrg.errors",
    "RecordSchemaError": "fedrg.errors",
    "DataImportError": "fedrg.errors",
    # data
    "load_cohort": "fedrg.data.cohort",
    "validate_cohort": "fedrg.data.validate",
    "CohortDataset": "fedrg.data.dataset",
    "split_indices": "fedrg.data.dataset",
    "RecordSchema": "fedrg.data.schema",
    "RADIOGENOMICS_RECORD": "fedrg.data.schema",
    "import_gdc": "fedrg.data.importers.build",
    "CohortLoader": "fedrg.data.loader",
    "DiskCohortLoader": "fedrg.data.loader",
    "SiteData": "fedrg.data.loader",
    # model and training
    "build_model": "fedrg.model.adapter",
    "ModelFactory": "fedrg.model.factory",
    "MultimodalAdapterFactory": "fedrg.model.factory",
    "load_base": "fedrg.model.base",
    "save_adapter": "fedrg.model.io",
    "load_adapter": "fedrg.model.io",
    "train_local": "fedrg.train.loop",
    "PrivacySeam": "fedrg.train.loop",
    "PlainSGD": "fedrg.train.loop",
    "evaluate": "fedrg.train.evaluate",
    "DPSession": "fedrg.privacy.dpsgd",
    # federation
    "Aggregator": "fedrg.federated.aggregate",
    "FedAvg": "fedrg.federated.aggregate",
    "FedAdam": "fedrg.federated.aggregate",
    "FedYogi": "fedrg.federated.aggregate",
    "FedAdagrad": "fedrg.federated.aggregate",
    "make_aggregator": "fedrg.federated.aggregate",
    "run_federation": "fedrg.federated.runner",
    "LocalTransport": "fedrg.federated.local",
    "run_simulated_federation": "fedrg.flower.simulation",
    "ServerResult": "fedrg.federated.server",
    "HospitalSite": "fedrg.hospital.site",
    "provision_roster": "fedrg.federated.secure",
    # privacy ledger and audit (fedrg.audit.verify is being reorganised on another branch:
    # keep this name pointing at wherever audit_path lives)
    "Ledger": "fedrg.privacy.ledger",
    "verify_ledger": "fedrg.privacy.ledger",
    "audit_path": "fedrg.audit.verify",
    # process environment
    "offline_env": "fedrg.runtime",
}

__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
