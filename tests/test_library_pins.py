"""Library internals fedrg relies on are the reviewed code, or fedrg refuses loudly.

Flower's SuperNode loop (fedrg.deploy.fast_supernode, tested in
tests/test_deploy_fast_supernode.py), Flower's ClientApp runtime (fedrg.deploy.pinned_clientapp
puts the bundle check into it) and Opacus' DP optimizer (fedrg.privacy.fused) have no public
API for what fedrg does with them; each is reached from one module, pinned by the source
digests of what it patches or reproduces. When the installed library changes,
test_installed_*_is_the_reviewed_code fails, and so does fedrg at run time.
"""

from __future__ import annotations

import inspect

import flwr.supernode.runtime.run_clientapp as runner
import pytest

from fedrg.deploy import pinned_clientapp
from fedrg.library_pins import LibraryChangedError, require_unchanged, source_digest


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
