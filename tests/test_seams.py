"""The seams (model factory, cohort loader, aggregator) plugged into the real hospital and
server code; none of them can switch DP-SGD or secure aggregation off (the site policy decides)."""

from __future__ import annotations

import numpy as np
import pytest
from test_federation_core import ArithmeticHospitals
from test_federation_core import _cfg as _arith_cfg

from fedrg.config import SiteConfig, load_config, to_run_config
from fedrg.data.loader import DEFAULT_COHORT_LOADER, CohortLoader, DiskCohortLoader, SiteData
from fedrg.errors import FedrgError, RecordSchemaError
from fedrg.federated.aggregate import Aggregator
from fedrg.federated.checkpoint import load_checkpoint
from fedrg.federated.server import FederationServer
from fedrg.model.factory import DEFAULT_MODEL_FACTORY, ModelFactory, MultimodalAdapterFactory
from fedrg.payload import Payload
from fedrg.policy import SitePolicy
from fedrg.privacy.ledger import Ledger


class CountingFactory:
    """The built-in model, counting builds (a plug-in the site must use)."""

    def __init__(self) -> None:
        self.builds = 0

    def build(self, model_cfg, data_cfg, seed):
        self.builds += 1
        return MultimodalAdapterFactory().build(model_cfg, data_cfg, seed)


class WithoutField:
    """A dataset view whose records lack one field."""

    def __init__(self, inner, field: str) -> None:
        self.inner, self.field = inner, field

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return {k: v for k, v in self.inner[i].items() if k != self.field}


class RecordingLoader:
    """The on-disk cohort through a custom loader, counting loads; can drop a field."""

    def __init__(self, drop: str | None = None) -> None:
        self.calls = 0
        self.drop = drop

    def load(self, site, data_cfg) -> SiteData:
        self.calls += 1
        data = DiskCohortLoader().load(site, data_cfg)
        if self.drop:
            data.train = WithoutField(data.train, self.drop)
        return SiteData(data.train, data.val, "custom-" + data.fingerprint[:8])


class Momentum:
    """FedAvg with server momentum, a custom Aggregator object."""

    name = "momentum"

    def __init__(self, beta: float = 0.5) -> None:
        self.beta, self.velocity, self.calls = beta, None, 0

    def apply(self, global_arrays, delta):
        self.calls += 1
        if self.velocity is None:
            self.velocity = [np.zeros_like(d) for d in delta]
        self.velocity = [self.beta * v + d for v, d in zip(self.velocity, delta, strict=True)]
        return [(w + v).astype(np.float32) for w, v in zip(global_arrays, self.velocity, strict=True)]

    def state_arrays(self):
        return {} if self.velocity is None else {f"v{i}": v for i, v in enumerate(self.velocity)}

    def load_state_arrays(self, state):
        self.velocity = [state[f"v{i}"] for i in range(len(state))] or None


def test_builtins_are_the_first_users_of_the_protocols():
    assert isinstance(DEFAULT_MODEL_FACTORY, ModelFactory) and isinstance(CountingFactory(), ModelFactory)
    assert isinstance(DEFAULT_COHORT_LOADER, CohortLoader) and isinstance(RecordingLoader(), CohortLoader)
    assert isinstance(Momentum(), Aggregator)


# ------------------------------------------------------------------ aggregator (server loop)

def test_a_custom_aggregator_object_drives_the_rounds_and_is_checkpointed(tmp_path):
    targets = {1: np.array([1.0, 0.0], np.float32), 2: np.array([0.0, 1.0], np.float32)}
    cfg = _arith_cfg(**{"federation.rounds": 2, "federation.hospitals": 2})
    agg = Momentum(beta=0.5)
    result = FederationServer(cfg, tmp_path, [np.zeros(2, np.float32)], aggregator=agg).run(
        ArithmeticHospitals(targets))
    # by hand: weights 1 and 2; round 1 delta d1 = mean target, v1 = d1, w1 = d1;
    # round 2 delta d2 = mean - w1 = 0, v2 = 0.5 v1, w2 = w1 + 0.5 v1
    mean = (1 * targets[1] + 2 * targets[2]) / 3
    np.testing.assert_allclose(result.global_arrays[0], 1.5 * mean, rtol=1e-6)
    assert agg.calls == 2
    ckpt = load_checkpoint(tmp_path)
    np.testing.assert_allclose(ckpt.optimizer_state["v0"], 0.5 * mean, rtol=1e-6)


def test_an_object_that_is_not_an_aggregator_is_refused_by_name(tmp_path):
    with pytest.raises(FedrgError, match="is not an Aggregator"):
        FederationServer(_arith_cfg(), tmp_path, [np.zeros(2, np.float32)], aggregator=object())


# ------------------------------------------------------------------ factory + loader (real site)

@pytest.fixture
def plugged_site(tmp_path, base_dir, fx_root):
    from model_fixtures import tiny_cohort

    from fedrg.hospital.site import HospitalSite
    from fedrg.model.fingerprint import model_content_hash

    def make(loader=None, factory=None):
        policy = SitePolicy(allowed_base_models=[model_content_hash(base_dir)])  # DP + secagg required
        site = SiteConfig(name="h1", cohort=str(tiny_cohort(fx_root, patients=24, seed=21)),
                          state_dir=str(tmp_path / "state"), policy=policy)
        return HospitalSite(site, model_factory=factory or CountingFactory(),
                            cohort_loader=loader or RecordingLoader())
    return make


def _request(site, base_dir, *extra):
    from fedrg.hospital.site import _model_for
    from fedrg.model.payload import get_adapter_arrays

    cfg = load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]", "training.local_epochs=0.5",
        "training.batch_size=8", "federation.rounds=2", *extra])
    p = Payload(meta={"config": to_run_config(cfg), "round": 1, "run_id": "r1", "hospitals_in_round": 3})
    p.put_array_list("global", get_adapter_arrays(_model_for(cfg, site.model_factory)))
    return p


def test_the_site_trains_the_plugged_model_on_the_plugged_data_with_dp_and_masking(plugged_site, base_dir):
    import torch

    site = plugged_site()
    state = Payload()
    saved = torch.get_num_threads()
    torch.set_num_threads(3)  # the host's own setting
    try:
        reply = site.handle("train", _request(site, base_dir, "training.threads=1"), state)
        assert torch.get_num_threads() == 3  # training.threads applied to the round only
    finally:
        torch.set_num_threads(saved)
    assert reply.meta["status"] == "ok" and reply.meta["private"] is True, reply.meta
    assert site.model_factory.builds >= 1 and site.cohort_loader.calls == 1
    assert not reply.arrays and state.array_list("pending")  # leaves only in the secure sum
    (entry,) = Ledger.open(site.site.state_dir, hospital="h1").read()
    assert entry.noise_multiplier >= site.site.policy.min_noise_multiplier > 0
    assert entry.dataset_fingerprint.startswith("custom-")


@pytest.mark.parametrize("extra", [["privacy.enabled=false"], ["secagg.enabled=false"],
                                   ["privacy.noise_multiplier=0.0"]])
def test_plugged_in_code_cannot_switch_dp_or_secure_aggregation_off(plugged_site, base_dir, extra):
    site = plugged_site()
    reply = site.handle("train", _request(site, base_dir, *extra), Payload())
    assert reply.meta["status"] == "declined" and reply.meta["reason"] == "policy_violation"
    assert site.cohort_loader.calls == 0  # refused before the plugged loader read any data
    assert Ledger.open(site.site.state_dir, hospital="h1").read() == []


def test_a_dataset_missing_a_required_field_is_an_error_naming_it(plugged_site, base_dir):
    site = plugged_site(loader=RecordingLoader(drop="expression"))
    with pytest.raises(RecordSchemaError, match="'expression'"):
        site.handle("train", _request(site, base_dir), Payload())
    assert Ledger.open(site.site.state_dir, hospital="h1").read() == []  # nothing spent
