"""The model seam: :class:`ModelFactory` builds the model a hospital trains and the server
starts from.

A factory returns a :class:`~fedrg.model.adapter.RadiogenomicsModel` (the built-in model,
configured, modified or subclassed as the factory likes): its trainable parameters are the
exchanged adapter (:mod:`fedrg.model.payload`), ``model(**model.encode_batch(batch))``
returns one loss per example, ``record_schema`` (:mod:`fedrg.data.schema`) lists the fields
its records need, and a hospital's evaluation reads ``per_example_loss``,
``marker_probabilities`` and ``generate_reports``. The built-in user is
:class:`MultimodalAdapterFactory` (LoRA on a causal LM, image and genomics encoders).

A factory never decides privacy: DP-SGD, clipping, noise and secure aggregation are set by
the hospital's site policy (:mod:`fedrg.hospital.request`) around whatever model it builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fedrg.config import DataConfig, ModelConfig

if TYPE_CHECKING:  # the model module loads torch and transformers: only when building
    from fedrg.model.adapter import RadiogenomicsModel

__all__ = ["DEFAULT_MODEL_FACTORY", "ModelFactory", "MultimodalAdapterFactory"]


@runtime_checkable
class ModelFactory(Protocol):
    """Builds the federated model from the (server-sent) model and data configs.

    Both sides must use the same factory: the server's initial adapter and every hospital's
    model must have the same trainable parameters (shapes are checked on each message).
    """

    def build(self, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> RadiogenomicsModel:
        """Return a fresh model for these configs and seed."""
        ...


class MultimodalAdapterFactory:
    """The built-in model: :func:`fedrg.model.adapter.build_model` (any local HF causal LM base)."""

    def build(self, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> RadiogenomicsModel:
        """Build the multimodal LoRA adapter on ``model_cfg.base``.

        Parameters
        ----------
        model_cfg, data_cfg
            The experiment's ``[model]`` and ``[data]`` tables.
        seed
            Seeds the adapter's initial weights.
        """
        from fedrg.model.adapter import build_model

        return build_model(model_cfg, data_cfg, seed=seed)

    def __repr__(self) -> str:
        return "MultimodalAdapterFactory()"


#: What :class:`~fedrg.hospital.site.HospitalSite` and the server use when given no factory.
DEFAULT_MODEL_FACTORY: ModelFactory = MultimodalAdapterFactory()
