"""docs/api.md's example runs as written: a custom model factory, dataset and aggregator in
one simulated federation, with DP-SGD applied (ledger noise) and every update masked."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, f"{DOC} should hold exactly one python example, found {len(blocks)}"
    return blocks[0]


def test_the_example_is_valid_python_using_only_public_names():
    import fedrg

    code = _example()
    compile(code, str(DOC), "exec")
    used = set(re.findall(r"\bfedrg\.([A-Za-z_]+)\b", code)) - {"data"}
    assert used and used <= set(fedrg.__all__), sorted(used - set(fedrg.__all__))


@pytest.mark.slow
def test_the_api_example_runs_with_dp_and_secure_aggregation(tmp_path, monkeypatch):
    from fedrg.federated.local import LocalTransport
    from fedrg.model.factory import MultimodalAdapterFactory
    from fedrg.model.payload import get_adapter_arrays
    from fedrg.privacy.ledger import Ledger

    sent: list[tuple[str, object]] = []
    original = LocalTransport.send

    def spy(self, action, messages, **kw):  # records what leaves the (real) hospitals
        replies = original(self, action, messages, **kw)
        sent.extend((action, r.payload) for r in replies.values() if r.payload is not None)
        return replies

    monkeypatch.setattr(LocalTransport, "send", spy)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "api_example"}
    exec(compile(_example(), str(DOC), "exec"), namespace)

    result, cfg = namespace["result"], namespace["cfg"]
    start, row = result.metrics["rounds"]
    assert start["round"] == 0 and start["auroc"]  # the starting adapter, evaluated
    assert row["aggregated"] and row["participants"] == 3
    # DP applied at every hospital: a signed ledger entry with noise, and the audit passes
    for name in ("h1", "h2", "h3"):
        entries = Ledger.open(tmp_path / "api-example" / f"state-{name}", hospital=name).read()
        # the start's metric release (round 0, riding on round 1's train message), the round's
        # DP-SGD entry, then its metric release (DP releases: the default policy)
        assert [(e.kind, e.round) for e in entries] == [("evaluation", 0), ("train", 1), ("evaluation", 1)]
        entry = entries[1]
        assert entry.noise_multiplier > 0 and entry.accountant == "rdp"
        assert entry.dataset_fingerprint == f"in-memory-{name}"
    assert namespace["audit"].ok
    # secure aggregation: no plain update or weight left a hospital, only masked ring vectors
    trains = [p for a, p in sent if a == "train"]
    assert len(trains) == 3 and all(not p.arrays and "weight" not in p.meta for p in trains)
    masked = [p.arrays["sa.masked"] for a, p in sent if a == "secagg_masked"]
    assert len(masked) == 3 and all(m.dtype.kind == "u" for m in masked)
    # the custom factory's model was exchanged (genomics encoder frozen: fewer arrays)
    full = get_adapter_arrays(MultimodalAdapterFactory().build(cfg.model, cfg.data, cfg.federation.seed))
    assert 0 < len(result.global_arrays) < len(full)
    # the custom aggregator ran: its momentum is in the run's checkpoint
    from fedrg.federated.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "api-example" / "run").optimizer_state
    assert len(state) == len(result.global_arrays) and any(np.abs(v).sum() > 0 for v in state.values())
