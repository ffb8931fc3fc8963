"""Library internals fedrg relies on are the reviewed code, or fedrg refuses loudly.

Flower's SuperNode loop (fedrg.deploy.fast_supernode, tested in
tests/test_deploy_fast_supernode.py), Flower's ClientApp runtime (fedrg.deploy.pinned_clientapp
puts the bundle check into it), Opacus' DP optimizer (fedrg.privacy.fused) and torch's
per-sample convolution gradients (fedrg.privacy.torch_internals, tested in
tests/test_torch_internals.py) have no public
API for what fedrg does with them; each is reached from one module, pinned by the source
digests of what it patches or reproduces. When the installed library changes,
test_installed_*_is_the_reviewed_code fails, and so does fedrg at run time.
"""

from __future__ import annotations

import inspect

import flwr.supernode.runtime.run_clientapp as runner
import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedrg.deploy import pinned_clientapp
from fedrg.library_pins import LibraryChangedError, require_unchanged, source_digest
from fedrg.privacy import fused


def test_installed_opacus_is_the_reviewed_code():
    # fails loudly when Opacus changes: review fedrg/privacy/fused.py against it, rerun
    # tests/test_privacy_fused.py, then update OPACUS_SOURCES
    got = {name: source_digest(obj) for name, obj in fused.opacus_functions().items()}
    assert got == fused.OPACUS_SOURCES
    # what the pin covers: the step fused.py replaces runs these, in this order
    src = inspect.getsource(DPOptimizer.pre_step)
    assert (src.index("self.clip_and_accumulate()") < src.index("self._check_skip_next_step()")
            < src.index("self.add_noise()") < src.index("self.scale_grad()"))


def test_changed_opacus_is_refused_before_any_step(monkeypatch):
    monkeypatch.setitem(fused.OPACUS_SOURCES, "DPOptimizer.add_noise", "f" * 64)
    monkeypatch.setitem(fused._reviewed, "ok", False)
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(LibraryChangedError,
                       match=r"opacus 1\.6\.\d+: DPOptimizer\.add_noise is not the code "
                             r"fedrg\.privacy\.fused was written against.*review "
                             r"fedrg\.privacy\.fused"):
        fused.FusedDPOptimizer(torch.optim.SGD([p], lr=0.1), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=4)


def test_require_unchanged_checks_every_name():
    def f() -> int:
        return 1

    require_unchanged("opacus", {"f": source_digest(f)}, {"f": f}, module="m")
    with pytest.raises(LibraryChangedError, match="pinned names"):
        require_unchanged("opacus", {"f": source_digest(f)}, {"f": f, "g": f}, module="m")
    with pytest.raises(LibraryChangedError, match="cannot read the source"):
        source_digest(len)  # a builtin: no source to check


def test_installed_flower_clientapp_runtime_is_the_reviewed_code():
    # fails loudly when Flower changes: review fedrg/deploy/pinned_clientapp.py (the bundle
    # check must still run before any file of the bundle is written), then update the digests
    pinned_clientapp.require_reviewed_flower()
    src = inspect.getsource(runner)
    # what the pin covers: one install, by the module-global name, before the app is loaded
    assert src.count("install_from_fab(") == 1
    assert src.index("install_from_fab(fab.content") < src.index("get_load_client_app_fn(")


def test_changed_flower_clientapp_runtime_is_refused(monkeypatch):
    monkeypatch.setitem(pinned_clientapp.FLOWER_SOURCES, "flwr.supernode.runtime.run_clientapp",
                        "0" * 64)
    monkeypatch.setitem(pinned_clientapp._reviewed, "ok", False)
    with pytest.raises(LibraryChangedError, match=r"flwr 1\.42\.\d+: flwr\.supernode\.runtime"
                       r"\.run_clientapp is not the code fedrg\.deploy\.pinned_clientapp"):
        pinned_clientapp.require_reviewed_flower()
