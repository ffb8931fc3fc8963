"""Per-step RDP vectors a hospital computed, kept in its state directory under its signature.

An RDP epsilon (:func:`fedrg.privacy.accounting.epsilon_of`) is cheap once the per-step RDP
vector of each ``(noise_multiplier, sample_rate)`` in the history is known; computing one
(Opacus's ``compute_rdp`` over :data:`~fedrg.privacy.accounting.RDP_ALPHAS`) costs about a
second of CPU. The accounting module memoises them per process; a fresh process (a Ray
worker, a Flower ClientApp, a new run) would compute the hospital's vectors again for its
first budget check. This module keeps them in ``rdp_vectors.json`` in the hospital's own
state directory, signed with the key that signs its ledger (Ed25519), so the next process
loads them instead.

A vector is used only when the file's signature verifies under the hospital's own ledger key
and the file was written for the same RDP orders and Opacus version: writing a vector the
hospital would accept needs the key that can also write its ledger. Anything else (missing,
corrupt, edited, other key, other orders or Opacus) is ignored, recomputed and overwritten;
nothing else in the state directory is touched. Only vectors the hospital's own messages
computed are written to its file (a worker process may serve several simulated hospitals).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedrg import signing
from fedrg.errors import PrivacyError
from fedrg.files import atomic_write
from fedrg.privacy.accounting import RDP_ALPHAS, known_rdp_vectors, remember_rdp_vector

log = logging.getLogger("fedrg.privacy")

STORE_NAME = "rdp_vectors.json"
FORMAT = 1
#: At most this many vectors per hospital (the most recently computed kept): about 1.3 kB each.
MAX_STORED = 512

#: ``str(path) -> (mtime_ns, size, pairs)`` of the store files this process has loaded and
#: verified: an unchanged file is not read or verified again.
_LOADED: dict[str, tuple[int, int, tuple[tuple[float, float], ...]]] = {}


def _identity() -> dict[str, Any]:
    """What the vectors are a function of besides ``(noise_multiplier, sample_rate)``."""
    import opacus

    orders = hashlib.sha256(json.dumps(list(RDP_ALPHAS)).encode()).hexdigest()
    return {"format": FORMAT, "opacus": str(opacus.__version__), "orders_sha256": orders}


def _payload(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def load_rdp_vectors(state_dir: str | Path, key: Ed25519PrivateKey) -> tuple[tuple[float, float], ...]:
    """Put the vectors this hospital signed into this process's memo.

    Parameters
    ----------
    state_dir
        The hospital's state directory.
    key
        The hospital's ledger signing key (only its public half is used here).

    Returns
    -------
    tuple
        The ``(noise_multiplier, sample_rate)`` pairs the file holds (empty when it is
        missing or not accepted).
    """
    path = Path(state_dir) / STORE_NAME
    try:
        st = path.stat()
    except OSError:
        return ()
    seen = _LOADED.get(str(path))
    if seen is not None and seen[:2] == (st.st_mtime_ns, st.st_size):
        known = known_rdp_vectors()
        if all(pair in known for pair in seen[2]):
            return seen[2]
    pairs = _read_verified(path, key)
    _LOADED[str(path)] = (st.st_mtime_ns, st.st_size, pairs)
    return pairs


def _read_verified(path: Path, key: Ed25519PrivateKey) -> tuple[tuple[float, float], ...]:
    try:
        doc = json.loads(path.read_text())
        signature = doc.pop("signature")
        if not signing.verify(key.public_key(), _payload(doc), signature):
            raise PrivacyError("its signature does not verify under this hospital's ledger key")
        if {k: doc.get(k) for k in _identity()} != _identity():
            raise PrivacyError("it was written for other RDP orders or another Opacus version")
        pairs: list[tuple[float, float]] = []
        for sigma, q, vector in doc["vectors"]:
            sigma, q = float(sigma), float(q)
            if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1):
                raise PrivacyError(f"it holds an invalid mechanism ({sigma!r}, {q!r})")
            remember_rdp_vector(noise_multiplier=sigma, sample_rate=q, vector=vector)
            pairs.append((sigma, q))
    except (OSError, ValueError, KeyError, TypeError, PrivacyError) as err:
        log.warning("ignoring the RDP cache %s (%s); its vectors are recomputed", path, err)
        return ()
    return tuple(pairs)


def save_rdp_vectors(state_dir: str | Path, key: Ed25519PrivateKey,
                     pairs: list[tuple[float, float]] | tuple[tuple[float, float], ...]) -> None:
    """Write the memo's vectors of ``pairs`` (oldest first; the last :data:`MAX_STORED`) to
    the hospital's store, signed with ``key`` (a failure to write costs time later, never the
    message)."""
    known = known_rdp_vectors()
    kept = [pair for pair in dict.fromkeys(pairs) if pair in known][-MAX_STORED:]
    rows = [[sigma, q, [float(x) for x in known[(sigma, q)]]] for sigma, q in kept]
    doc: dict[str, Any] = {**_identity(), "key_id": signing.key_id(key), "vectors": rows}
    doc["signature"] = signing.sign(key, _payload(doc))
    path = Path(state_dir) / STORE_NAME
    try:
        atomic_write(path, json.dumps(doc).encode(), mode=0o600)
        st = path.stat()
        _LOADED[str(path)] = (st.st_mtime_ns, st.st_size, tuple(kept))
    except OSError as err:
        log.warning("could not write the RDP cache %s (%s); it is recomputed next time", path, err)


@contextlib.contextmanager
def rdp_vectors_kept(state_dir: str | Path, key: Ed25519PrivateKey) -> Iterator[None]:
    """Around one hospital's message: load its signed vectors first; afterwards add the
    vectors its message computed (new in this process's memo) to its store."""
    own = load_rdp_vectors(state_dir, key)
    before = set(known_rdp_vectors())
    try:
        yield
    finally:
        new = [pair for pair in known_rdp_vectors() if pair not in before]
        if new:
            save_rdp_vectors(state_dir, key, [*own, *new])
