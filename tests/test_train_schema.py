"""The declared record schema of train_local: a missing field is an error naming it."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_data_cfg, tiny_model_cfg
from torch import nn

from fedrg.config import TrainingConfig
from fedrg.data.schema import RADIOGENOMICS_RECORD, RecordSchema, batch_size
from fedrg.errors import RecordSchemaError
from fedrg.model.adapter import build_model
from fedrg.train.loop import PlainSGD, train_local


class _Without(torch.utils.data.Dataset):
    """A real CohortDataset with one field dropped from every item."""

    def __init__(self, inner, drop: str):
        self.inner, self.drop = inner, drop

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        item = dict(self.inner[i])
        item.pop(self.drop)
        return item


@pytest.mark.parametrize("field", ["has_genomics", "report", "image"])
def test_dataset_missing_a_required_field_fails_naming_it(base_dir, dataset, field):
    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg())
    with pytest.raises(RecordSchemaError, match=rf"train_dataset\[0\] lacks .*'{field}'"):
        train_local(model, _Without(dataset, field), TrainingConfig(batch_size=4), steps=2)


class _Seam(PlainSGD):
    """Plain SGD whose batches lose a field after the first one (a faulty custom sampler)."""

    def batches(self, dataset, *, steps=None):
        for k, batch in enumerate(super().batches(dataset, steps=steps)):
            if k == 1:
                batch = {key: v for key, v in batch.items() if key != "marker_mask"}
            yield batch


def test_a_batch_missing_a_field_fails_instead_of_being_skipped(base_dir, dataset):
    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg())
    with pytest.raises(RecordSchemaError, match="a training batch lacks .*'marker_mask'"):
        train_local(model, dataset, TrainingConfig(batch_size=4), steps=3,
                    privacy=_Seam(batch_size=4, seed=0))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class _Regressor(nn.Module):
    record_schema = RecordSchema({"x": "float32 [3]", "y": "float32 target"}, name="regression")

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def encode_batch(self, batch):
        return {"x": batch["x"], "y": batch["y"]}

    def forward(self, x, y):
        return (self.lin(x).squeeze(-1) - y) ** 2


class _PairSGD(PlainSGD):
    def batches(self, dataset, *, steps=None):
        n = len(dataset)
        for k in range(steps or 0):
            idx = [(k * 4 + j) % n for j in range(4)]
            items = [dataset[i] for i in idx]
            yield {key: torch.stack([it[key] for it in items]) for key in ("x", "y")}


def test_a_custom_schema_trains_with_no_radiogenomics_fields():
    torch.manual_seed(0)
    model = _Regressor()
    cfg = TrainingConfig(batch_size=4, lr=0.05, augment=True)
    metrics = train_local(model, _Pairs(), cfg, steps=40, privacy=_PairSGD(batch_size=4))
    assert metrics["examples"] == 160 and metrics["empty_steps"] == 0
    assert metrics["loss_last"] < metrics["loss_mean"]
    with pytest.raises(RecordSchemaError, match="'y'"):
        train_local(model, [{"x": torch.zeros(3)}], cfg, steps=1)


def test_batch_size_reads_the_first_field():
    assert batch_size({}, RADIOGENOMICS_RECORD) == 0
    s = RecordSchema({"a": "", "b": ""})
    assert batch_size({"a": torch.zeros(5, 2), "b": ["x"] * 5}, s) == 5
    assert batch_size({"a": ["p", "q"], "b": [1, 2]}, s) == 2
    with pytest.raises(RecordSchemaError, match="'b'"):
        batch_size({"a": torch.zeros(2)}, s)
    with pytest.raises(RecordSchemaError, match="must be dicts"):
        s.check([1, 2], where="item 0")
