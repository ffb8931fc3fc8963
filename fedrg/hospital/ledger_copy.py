"""The hospital's answer to ``ledger``: its public ledger copy, and nothing else.

Exactly the files an auditor needs: ``ledger.jsonl`` (signed entries), ``ledger_head.json``
(signed head) and ``ledger_ed25519.pub`` (the verification key). The signing key never
leaves the hospital. The server side is :mod:`fedrg.federated.ledger_copy`.
"""

from __future__ import annotations

from pathlib import Path

from fedrg.payload import Payload

PUBLIC_LEDGER_FILES = ("ledger.jsonl", "ledger_head.json", "ledger_ed25519.pub")


def public_ledger_payload(state_dir: str | Path, site_name: str) -> Payload:
    """The hospital's answer to ``ledger``: its name and its public ledger files.

    Parameters
    ----------
    state_dir : str or Path
        The hospital's state directory (where its ledger lives).
    site_name : str
        The hospital's name (the directory the server writes the copy to).

    Returns
    -------
    Payload
        ``meta["site"]`` and ``meta["files"]`` (file name -> bytes; only
        :data:`PUBLIC_LEDGER_FILES` that exist). No arrays.
    """
    state = Path(state_dir)
    files = {name: (state / name).read_bytes() for name in PUBLIC_LEDGER_FILES
             if (state / name).is_file()}
    return Payload(meta={"site": site_name, "files": files})
