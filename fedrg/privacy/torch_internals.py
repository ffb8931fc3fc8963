"""The one torch internal fedrg relies on, pinned: per-sample convolution gradients by unfolding.

In Opacus' ``ew`` mode (torch's expanded weights) the per-sample gradient of a convolution
weight is computed by ``conv_backward`` in ``torch/nn/utils/_expanded_weights/conv_utils.py``:
a grouped convolution below the module global ``THRESHOLD`` (32) examples, an unfold (im2col)
and a batched matrix product at or above it. Both give the same per-sample gradients
(``tests/test_torch_internals.py``); on CPU the unfold is faster at the batch sizes DP training
draws (batch 16: DP step ratio 1.22 against 1.28, /work/shared/FACTS.md). torch has no public
switch, so :func:`conv_grad_samples_by_unfold` lowers that global while fedrg's ``ew`` steps
run. This module is the only one of fedrg that touches it.

* **Pinned.** The code was reviewed against the ``conv_backward`` whose source digest is
  :data:`TORCH_SOURCES`; with any other torch, entering the block raises
  :class:`~fedrg.library_pins.LibraryChangedError` (review this module against the new
  torch, rerun ``tests/test_torch_internals.py`` and ``tests/test_privacy_dpsgd*.py``, then
  update the digest), never a silent assignment to a name torch no longer reads.
* **Thread-safe.** The global is process-wide: blocks entered from several threads share
  one lowering (a lock and a count of the blocks inside), and the last block to leave puts
  back the value found by the first, so no thread restores it under another's step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch.nn.utils._expanded_weights import conv_utils

from fedrg.library_pins import require_unchanged

CONV_UTILS = "torch.nn.utils._expanded_weights.conv_utils"

TORCH_SOURCES = {  # torch 2.13.0, as reviewed for this module
    f"{CONV_UTILS}.conv_backward": "0d6eb6ceb745ec98b24c7535fa45fbaf91e24f069529a54c1ebe18a6dd8c1609",
}
"""``name -> SHA-256 of its source`` for the torch code whose behaviour this module changes."""


def torch_functions() -> dict[str, object]:
    """The installed torch functions named in :data:`TORCH_SOURCES`."""
    return {name: getattr(conv_utils, name.rpartition(".")[2]) for name in TORCH_SOURCES}


_reviewed = {"ok": False}  # checked once per process (the installed code cannot change)


def require_reviewed_torch() -> None:
    """Raise :class:`~fedrg.library_pins.LibraryChangedError` unless torch is the reviewed code."""
    if not _reviewed["ok"]:
        require_unchanged("torch", TORCH_SOURCES, torch_functions(),
                          module="fedrg.privacy.torch_internals")
        _reviewed["ok"] = True


_lock = threading.Lock()
_inside = 0  # blocks currently inside conv_grad_samples_by_unfold (all threads)
_saved = conv_utils.THRESHOLD  # THRESHOLD as the first of them found it


@contextmanager
def conv_grad_samples_by_unfold() -> Iterator[None]:
    """Inside the block, torch's expanded weights unfold every convolution's per-sample
    gradient, at any batch size (same gradients, faster on CPU than the grouped convolution).

    Raises
    ------
    LibraryChangedError
        If the installed torch's ``conv_backward`` is not the reviewed code.
    """
    global _inside, _saved
    require_reviewed_torch()
    with _lock:
        if _inside == 0:
            _saved = conv_utils.THRESHOLD
            conv_utils.THRESHOLD = 0
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                conv_utils.THRESHOLD = _saved
