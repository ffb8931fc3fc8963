"""The multimodal radiogenomics adapter around a frozen causal LM.

Layout of one sequence fed to the LM (all examples share the prefix length)::

    [k image prompt embeddings][m genomics prompt embeddings][<s>] report tokens [</s>] <pad>...

Trainable (and exchanged) parts: peft LoRA on the LM's projections, the image encoder and its
projector, the genomics encoder and its projector, the marker head. The LM itself is frozen
and stays in ``train()`` mode (dropout-free) so Opacus hooks see activations.

``model(**tensors)`` takes tensors only and returns a per-example loss ``[B]``: a per-sequence
next-token loss on the report (mean over that report's tokens, never averaged across the
batch) plus a masked marker BCE. Every trainable parameter takes part in every forward:
withheld genomics are masked multiplicatively, an empty report has a zero loss mask.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedrg.config import DataConfig, ModelConfig
from fedrg.data.schema import RADIOGENOMICS_RECORD
from fedrg.errors import ModelError
from fedrg.model.base import load_base
from fedrg.model.encoders import GenomicsEncoder, ImageEncoder, MarkerHead, PromptProjector
from fedrg.model.radiomics import FEATURE_COUNT

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ModelConfig().target_modules
TENSOR_KEYS = ("image", "expression", "mutations", "has_genomics", "markers", "marker_mask")


def _linear_leaf_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and name:
            names.add(name.split(".")[-1])
    return names


#: Default LoRA targets per ``config.model_type`` (attention and MLP projections), used when
#: ``model.target_modules`` is left at its default (the Llama names).
ARCHITECTURE_TARGETS: dict[str, list[str]] = {
    "llama": list(DEFAULT_TARGETS),
    "mistral": list(DEFAULT_TARGETS),
    "qwen2": list(DEFAULT_TARGETS),
    "qwen3": list(DEFAULT_TARGETS),
    "gemma": list(DEFAULT_TARGETS),
    "gemma2": list(DEFAULT_TARGETS),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def resolve_target_modules(base: nn.Module, wanted: list[str]) -> list[str] | str:
    """Map ``model.target_modules`` onto the base LM's layer names.

    ``["all-linear"]`` is passed to peft as is. The default (Llama names) follows the
    architecture: the names of :data:`ARCHITECTURE_TARGETS` for the base's
    ``config.model_type`` that the base has (GPT-2: ``c_attn``/``c_proj``/``c_fc``), else the
    Llama names it has, else every linear layer of the blocks (peft ``"all-linear"``). A
    user-given list must match exactly.
    """
    if wanted == ["all-linear"]:
        return "all-linear"
    have = _linear_leaf_names(base)
    present = [t for t in wanted if t in have]
    if list(wanted) == list(DEFAULT_TARGETS):
        model_type = str(getattr(getattr(base, "config", None), "model_type", ""))
        known = [t for t in ARCHITECTURE_TARGETS.get(model_type, []) if t in have]
        if known:
            return known
        if present:
            return present
        log.info("base %r has none of the known projection names; LoRA on all linear layers",
                 model_type)
        return "all-linear"
    missing = [t for t in wanted if t not in have]
    if missing:
        raise ModelError(
            f"model.target_modules={wanted}: {missing} not found in the base LM; "
            f"its linear layers are named {sorted(have - {'lm_head'})} "
            "(or set model.target_modules=['all-linear'])"
        )
    return present


class RadiogenomicsModel(nn.Module):
    """LoRA'd causal LM + image/genomics prompt projectors + marker heads.

    Build it with :func:`build_model`.
    """

    #: Fields every training record must carry (checked by ``train_local``).
    record_schema = RADIOGENOMICS_RECORD

    def __init__(
        self,
        lm: Any,  # a peft-wrapped Hugging Face causal LM (nn.Module)
        tokenizer: Any,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        target_modules: list[str] | str,
    ):
        super().__init__()
        self.lm: Any = lm
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.data_cfg = data_cfg
        self.target_modules = target_modules
        hidden = lm.get_input_embeddings().embedding_dim
        w = model_cfg.encoder_width
        self.image_encoder = ImageEncoder(
            data_cfg.image_mode, w, list(data_cfg.image_shape), norm=model_cfg.image_norm,
            radiomics=model_cfg.radiomic_features,
        )
        self.image_proj = PromptProjector(w, model_cfg.image_tokens, hidden)
        self.genomics_encoder = GenomicsEncoder(
            len(data_cfg.gene_panel), len(data_cfg.mutation_genes), w
        )
        self.genomics_proj = PromptProjector(w, model_cfg.genomics_tokens, hidden)
        linear = model_cfg.linear_marker_paths
        genomics_in = len(data_cfg.gene_panel) + len(data_cfg.mutation_genes) + 1
        self.marker_head = MarkerHead(
            w, w + 1, w, len(data_cfg.markers),
            image_linear=FEATURE_COUNT if linear and model_cfg.radiomic_features else 0,
            genomics_linear=genomics_in if linear else 0,
        )
        self.prefix_len = model_cfg.image_tokens + model_cfg.genomics_tokens
        bos = tokenizer.bos_token_id
        self.start_id = int(bos if bos is not None else tokenizer.eos_token_id)
        self.eos_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.start_id)
        self.pad_id = int(tokenizer.pad_token_id)

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> RadiogenomicsModel:
        """Switch the trainable parts; the frozen LM always stays in train mode (Opacus)."""
        super().train(mode)
        self.lm.train(True)
        return self

    def tokenize_reports(self, reports: list[str]) -> tuple[torch.Tensor, ...]:
        """``<s> report </s>`` right-padded ids, attention mask and loss mask ``[B,T]``.

        The loss mask marks the report tokens and ``</s>`` (positions >= 1); it is all
        zero for an empty report.
        """
        limit = self.model_cfg.max_report_tokens
        seqs, has = [], []
        for text in reports:
            text = (text or "").strip()
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:limit] if text else []
            seqs.append([self.start_id, *ids, self.eos_id])
            has.append(bool(text))
        T = max(len(s) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.float32)
        loss_mask = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1.0
            if has[i]:
                loss_mask[i, 1: len(s)] = 1.0
        return input_ids, attn, loss_mask

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Collated batch (see fedrg.data.dataset) -> the tensors ``forward`` takes."""
        dev = self.device
        out = {k: batch[k].to(dev, dtype=torch.float32) for k in TENSOR_KEYS}
        ids, attn, loss_mask = self.tokenize_reports(list(batch["report"]))
        out.update(input_ids=ids.to(dev), attention_mask=attn.to(dev), loss_mask=loss_mask.to(dev))
        return out

    def _features(self, image, expression, mutations, has_genomics):
        """Prompt embeddings ``[B,P,hidden]``, image ``[B,w]`` and genomics-side ``[B,w+1]``
        features (zero where genomics are withheld), and the marker head's linear-path inputs
        (standardised radiomic features; the masked genomic profile with its flag)."""
        img, radiomic = self.image_encoder.features_and_radiomics(image)
        return self._features_from(img, radiomic, expression, mutations, has_genomics)

    def _features_from(self, img, radiomic, expression, mutations, has_genomics):
        """:meth:`_features` from the image encoder's output ``(img, radiomic)`` (the part
        that depends on the image alone)."""
        g = has_genomics.view(-1, 1)
        gen = self.genomics_encoder(expression * g, mutations * g) * g
        prompt = torch.cat(
            [self.image_proj(img), self.genomics_proj(gen) * g.unsqueeze(-1)], dim=1
        )
        linear = {"image_inputs": radiomic,
                  "genomics_inputs": torch.cat([expression * g, mutations * g, g], dim=-1)}
        return prompt, img, torch.cat([gen, g], dim=-1), linear

    # ------------------------------------------------------------------ training

    def marker_logits(self, image: torch.Tensor, expression: torch.Tensor, mutations: torch.Tensor,
                      has_genomics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused_logits, image_only_logits)`` ``[B, K]`` without running the LM (the
        encoders and the marker head only; used by public pre-training)."""
        _, img, other, linear = self._features(image, expression, mutations, has_genomics)
        return self.marker_head(img, other, **linear)

    def forward(
        self,
        image: torch.Tensor,
        expression: torch.Tensor,
        mutations: torch.Tensor,
        has_genomics: torch.Tensor,
        markers: torch.Tensor,
        marker_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Per-example loss ``[B]`` = report_w * report NLL + marker_w * masked marker BCE.

        The marker BCE is the mean over the head's two answers: fused (image + genomics when
        present) and image-only (the radiogenomics question), so the image path learns the
        markers from every example, genomics or not.
        """
        features = self._features(image, expression, mutations, has_genomics)
        return self._loss_from(features, markers, marker_mask, input_ids, attention_mask, loss_mask)

    def _loss_from(self, features, markers, marker_mask, input_ids, attention_mask, loss_mask):
        """:meth:`forward` from :meth:`_features`'s output."""
        prompt, img, other, linear = features
        tok = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt.to(tok.dtype), tok], dim=1)
        B, P = prompt.shape[0], prompt.shape[1]
        attn = torch.cat([attention_mask.new_ones((B, P)), attention_mask], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=attn, use_cache=False).logits
        text_logits = logits[:, P:-1].float()  # position P+t predicts token t+1
        nll = F.cross_entropy(
            text_logits.reshape(-1, text_logits.shape[-1]),
            input_ids[:, 1:].reshape(-1),
            reduction="none",
        ).view(B, -1)
        m = loss_mask[:, 1:]
        report_loss = (nll * m).sum(1) / m.sum(1).clamp(min=1.0)

        fused_logits, image_logits = self.marker_head(img, other, **linear)
        bce = 0.5 * (
            F.binary_cross_entropy_with_logits(fused_logits, markers, reduction="none")
            + F.binary_cross_entropy_with_logits(image_logits, markers, reduction="none")
        )
        marker_loss = (bce * marker_mask).sum(1) / marker_mask.sum(1).clamp(min=1.0)
        cfg = self.model_cfg
        return cfg.report_loss_weight * report_loss + cfg.marker_loss_weight * marker_loss

    def per_example_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """``forward(**encode_batch(batch))``."""
        return self(**self.encode_batch(batch))

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def marker_probabilities(self, batch: dict[str, Any], *, withhold_genomics: bool = False,
                             test_time_flip: bool = True):
        """Marker probabilities ``[B,K]``: fused, or from the image alone when
        ``withhold_genomics`` (the radiogenomics question: nothing from the genomics).

        With ``test_time_flip`` (default) the logits are averaged over the image and its
        left-right mirror image (the side of a tumour carries no marker signal; training sees
        both through augmentation)."""
        t = self.encode_batch(batch)
        has = torch.zeros_like(t["has_genomics"]) if withhold_genomics else t["has_genomics"]
        images = (t["image"], t["image"].flip(-1)) if test_time_flip else (t["image"],)
        return self._probabilities_from(
            [self._features(image, t["expression"], t["mutations"], has) for image in images],
            withhold_genomics=withhold_genomics)

    def _probabilities_from(self, features: list[tuple], *, withhold_genomics: bool) -> torch.Tensor:
        """:meth:`marker_probabilities` from :meth:`_features`'s output for each image view."""
        logits = []
        for _, img, other, linear in features:
            fused_logits, image_logits = self.marker_head(img, other, **linear)
            logits.append(image_logits if withhold_genomics else fused_logits)
        return torch.sigmoid(torch.stack(logits).mean(0))

    #: The methods :meth:`evaluation_outputs` computes in one pass; a subclass that overrides
    #: any of them is evaluated through its own methods, one call each.
    _FUSED_EVALUATION = ("forward", "per_example_loss", "marker_probabilities", "generate_reports",
                         "encode_batch", "_features", "_features_from", "_loss_from",
                         "_probabilities_from", "_generate_from")

    @torch.no_grad()
    def evaluation_outputs(self, batch: dict[str, Any], *, generate: bool = True) -> dict[str, Any]:
        """What an evaluation reads of one batch, each exactly as its own method computes it:
        ``loss`` (:meth:`per_example_loss`), ``probs_image`` and ``probs_multimodal``
        (:meth:`marker_probabilities` with and without ``withhold_genomics``) and, with
        ``generate``, ``generated`` (:meth:`generate_reports`).

        The batch is encoded once and the image encoder runs once per view (the image and its
        mirror image) instead of once per method: its output depends on the image alone, so
        the loss, both probabilities and the generation prompt share it. The results are the
        same tensors the separate calls return (the same operations on the same inputs).
        """
        if any(getattr(type(self), name) is not getattr(RadiogenomicsModel, name)
               for name in self._FUSED_EVALUATION):
            return {"loss": self.per_example_loss(batch),
                    "probs_image": self.marker_probabilities(batch, withhold_genomics=True),
                    "probs_multimodal": self.marker_probabilities(batch),
                    "generated": self.generate_reports(batch) if generate else None}
        t = self.encode_batch(batch)
        views = [self.image_encoder.features_and_radiomics(image)
                 for image in (t["image"], t["image"].flip(-1))]
        given, withheld = t["has_genomics"], torch.zeros_like(t["has_genomics"])
        multimodal = [self._features_from(img, rad, t["expression"], t["mutations"], given)
                      for img, rad in views]
        image_only = [self._features_from(img, rad, t["expression"], t["mutations"], withheld)
                      for img, rad in views]
        loss = self._loss_from(multimodal[0], t["markers"], t["marker_mask"], t["input_ids"],
                               t["attention_mask"], t["loss_mask"])
        return {"loss": loss,
                "probs_image": self._probabilities_from(image_only, withhold_genomics=True),
                "probs_multimodal": self._probabilities_from(multimodal, withhold_genomics=False),
                "generated": self._generate_from(multimodal[0][0]) if generate else None}

    @torch.no_grad()
    def generate_reports(
        self,
        batch: dict[str, Any],
        *,
        max_new_tokens: int | None = None,
        withhold_genomics: bool = False,
    ) -> list[str]:
        """Greedy report generation conditioned on the image + genomics prompt tokens."""
        t = self.encode_batch(batch)
        has = torch.zeros_like(t["has_genomics"]) if withhold_genomics else t["has_genomics"]
        prompt, _, _, _ = self._features(t["image"], t["expression"], t["mutations"], has)
        return self._generate_from(prompt, max_new_tokens=max_new_tokens)

    def _generate_from(self, prompt: torch.Tensor, *, max_new_tokens: int | None = None) -> list[str]:
        """:meth:`generate_reports` from the prompt embeddings :meth:`_features` made."""
        B = prompt.shape[0]
        emb = self.lm.get_input_embeddings()
        start = torch.full((B, 1), self.start_id, dtype=torch.long, device=prompt.device)
        embeds = torch.cat([prompt.to(emb.weight.dtype), emb(start)], dim=1)
        attn = torch.ones((B, embeds.shape[1]), dtype=torch.long, device=prompt.device)
        limit = max_new_tokens or self.model_cfg.max_report_tokens + 1
        out = self.lm(inputs_embeds=embeds, attention_mask=attn, use_cache=True)
        past = out.cache
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        tokens: list[torch.Tensor] = []
        for _ in range(limit):
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            tokens.append(nxt)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
            attn = torch.cat([attn, attn.new_ones((B, 1))], dim=1)
            out = self.lm(
                inputs_embeds=emb(nxt[:, None]), attention_mask=attn,
                cache=past, use_cache=True,
            )
            past = out.cache
        ids = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(B)]
        texts = []
        for row in ids:
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    # ------------------------------------------------------------------ bookkeeping

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every trainable parameter, in a fixed order."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        return {"trainable": trainable, "total": total}


def build_model(model_cfg: ModelConfig, data_cfg: DataConfig, *, seed: int = 0) -> RadiogenomicsModel:
    """Load the frozen base LM (offline), add LoRA, encoders, projectors and marker heads.

    Parameters
    ----------
    model_cfg, data_cfg
        Config sections; ``model_cfg.base`` names the base LM.
    seed
        Seeds the initialisation of every trainable part (the global RNG is left alone).

    Raises
    ------
    ModelError
        Base LM missing/unloadable, target modules not found, or ``lora_dropout`` > 0.
    """
    from peft import LoraConfig, get_peft_model

    if model_cfg.lora_dropout != 0.0:
        raise ModelError(
            f"model.lora_dropout={model_cfg.lora_dropout}: must be 0 (per-sample gradients under "
            "DP-SGD need a deterministic LoRA forward); set model.lora_dropout=0"
        )
    base, tokenizer = load_base(model_cfg.base)
    for p in base.parameters():
        p.requires_grad_(False)
    targets = resolve_target_modules(base, list(model_cfg.target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=model_cfg.lora_rank,
            lora_alpha=model_cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # transformers' own deprecation notice inside peft
            warnings.filterwarnings("ignore", category=FutureWarning)
            lm = get_peft_model(base, lora)
        model = RadiogenomicsModel(lm, tokenizer, model_cfg, data_cfg, targets)
    model.train()
    return model
