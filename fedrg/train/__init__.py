"""The local training loop (``loop``: ``train_local`` and its privacy seam) and held-out
evaluation (``evaluate``)."""

from fedrg._exports import lazy_exports

_EXPORTS = {
    "train_local": "fedrg.train.loop",
    "local_steps": "fedrg.train.schedule",
    "poisson_sample_rate": "fedrg.train.schedule",
    "PrivacySeam": "fedrg.train.loop",
    "PlainSGD": "fedrg.train.loop",
    "SizedDataset": "fedrg.train.loop",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
