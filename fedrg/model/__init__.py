"""The model: the frozen base LM (``base``), the multimodal LoRA adapter (``adapter``),
its encoders, the exchanged arrays (``payload``) and adapter files (``io``). See docs/model.md."""

from fedrg._exports import lazy_exports

_EXPORTS = {
    "RadiogenomicsModel": "fedrg.model.adapter",
    "build_model": "fedrg.model.adapter",
    "ARCHITECTURE_TARGETS": "fedrg.model.adapter",
    "load_base": "fedrg.model.base",
    "resolve_base_dir": "fedrg.model.base",
    "get_adapter_arrays": "fedrg.model.payload",
    "set_adapter_arrays": "fedrg.model.payload",
    "save_adapter": "fedrg.model.io",
    "load_adapter": "fedrg.model.io",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
