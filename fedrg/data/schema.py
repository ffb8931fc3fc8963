"""The record schema: which fields a training record must carry.

A dataset handed to :func:`fedrg.train.loop.train_local` yields dict records; the model
that trains on them declares the fields it needs (``model.record_schema``, default
:data:`RADIOGENOMICS_RECORD`, the built-in adapter's). A record or batch that lacks one is a
:class:`~fedrg.errors.RecordSchemaError` naming the field, never a silently skipped batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedrg.errors import RecordSchemaError

__all__ = ["RADIOGENOMICS_RECORD", "RecordDataset", "RecordSchema", "batch_size"]


class RecordDataset(Protocol):
    """What fedrg needs of a dataset: ``len()`` and integer indexing to dict records (field
    name -> tensor, string or number, as the model's :class:`RecordSchema` lists them).

    :class:`fedrg.data.dataset.CohortDataset`, a ``torch.utils.data.Dataset`` with
    ``__len__`` or a list of dicts all qualify. A dataset may also offer ``collate(items)``
    and ``empty_batch()`` (a shaped empty batch for an empty Poisson draw).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RecordSchema:
    """Required fields of one record, each with a one-line description.

    Parameters
    ----------
    fields
        ``name -> description`` of every required field (order kept in messages).
    name
        Shown in error messages (e.g. the model that needs the fields).
    """

    fields: Mapping[str, str]
    name: str = "record"
    optional: Mapping[str, str] = field(default_factory=dict)

    def missing(self, record: Mapping[str, Any]) -> list[str]:
        """Required field names absent from ``record``."""
        return [f for f in self.fields if f not in record]

    def check(self, record: Any, *, where: str) -> None:
        """Raise :class:`RecordSchemaError` naming every missing field of ``record``.

        Parameters
        ----------
        record
            A dataset item or a collated batch (a mapping).
        where
            What the record is, for the message (e.g. ``"train_dataset[0]"``).
        """
        if not isinstance(record, Mapping):
            raise RecordSchemaError(
                f"{where} is a {type(record).__name__}; {self.name} records must be dicts with "
                f"the fields {', '.join(self.fields)}"
            )
        missing = self.missing(record)
        if missing:
            lines = "; ".join(f"'{f}' ({self.fields[f]})" for f in missing)
            raise RecordSchemaError(
                f"{where} lacks required field(s) of the {self.name} schema: {lines}. "
                f"It has: {', '.join(map(str, record)) or 'no fields'}. Add the field(s) to the "
                "dataset's items, or train a model whose record_schema does not need them."
            )


#: Fields the built-in multimodal adapter (and ``fedrg.data.dataset.CohortDataset``) use.
RADIOGENOMICS_RECORD = RecordSchema(
    name="radiogenomics",
    fields={
        "image": "float32 [1,H,W] or [1,D,H,W], intensities in [0, 1]",
        "expression": "float32 [G], standardised expression of data.gene_panel",
        "mutations": "float32 [M], 0/1 per data.mutation_genes",
        "has_genomics": "float32 scalar, 1.0 when the patient has genomics",
        "markers": "float32 [K], 0/1 per data.markers (0 where unknown)",
        "marker_mask": "float32 [K], 1 where the marker is known",
        "report": "str, the radiology report (may be empty)",
    },
    optional={"patient_id": "str, never used in training"},
)


def batch_size(batch: Mapping[str, Any], schema: RecordSchema) -> int:
    """Number of records in a collated ``batch``: the length of the schema's first field.

    An empty mapping (an empty Poisson batch of a dataset without ``empty_batch``) has size 0.
    """
    if not batch:
        return 0
    first = next(iter(schema.fields))
    schema.check(batch, where="a training batch")
    value = batch[first]
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    return len(value)
