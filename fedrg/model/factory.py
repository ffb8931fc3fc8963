"""The model seam: :class:`ModelFactory` builds the model a hospital trains and the server
starts from.

A factory returns a ``torch.nn.Module`` with the adapter interface the training loop uses:
its trainable parameters are the exchanged adapter (:mod:`fedrg.model.payload`),
``forward(batch)`` returns a dict with a per-example ``loss_vec``, and it may declare
``record_schema`` (:mod:`fedrg.data.schema`) and ``data_cfg``. The built-in user is
:class:`MultimodalAdapterFactory` (LoRA on a causal LM, image and genomics encoders).

A factory never decides privacy: DP-SGD, clipping, noise and secure aggregation are set by
the hospital's site policy (:mod:`fedrg.hospital.request`) around whatever model it builds.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from fedrg.config import DataConfig, ModelConfig

__all__ = ["DEFAULT_MODEL_FACTORY", "ModelFactory", "MultimodalAdapterFactory"]


@runtime_checkable
class ModelFactory(Protocol):
    """Builds the federated model from the (server-sent) model and data configs.

    Both sides must use the same factory: the server's initial adapter and every hospital's
    model must have the same trainable parameters (shapes are checked on each message).
    """

    def build(self, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> Any:
        """Return a fresh model (``torch.nn.Module``) for these configs and seed."""
        ...


class MultimodalAdapterFactory:
    """The built-in model: :func:`fedrg.model.adapter.build_model` (any local HF causal LM base)."""

    def build(self, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> Any:
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
