"""The hospitals' public ledger copies, sent through the federation's own messages.

At the end of a deployed run the server asks every hospital for its public ledger copy
(action ``ledger``); each hospital answers with exactly the files an auditor needs and
nothing else: ``ledger.jsonl`` (signed entries), ``ledger_head.json`` (signed head) and
``ledger_ed25519.pub`` (the verification key). The server writes them to
``<run_dir>/ledgers/<hospital>/``, the layout ``fedrg simulate`` uses, so ``fedrg audit
RUN`` works the same for both. The signing key never leaves the hospital.

No Flower imports: the server loop and the ClientApp glue call these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from fedrg.hospital.ledger_copy import PUBLIC_LEDGER_FILES
from fedrg.payload import Payload

MAX_COPY_BYTES = 8 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def write_ledger_copies(run_dir: str | Path, replies: Mapping[int, Payload]) -> dict[str, Path]:
    """Write each hospital's public ledger copy to ``run_dir/ledgers/<site>/``.

    A reply is skipped (it is then missing from the result) when its site name is not a
    plain name, an earlier reply claimed the same name, it holds no ``ledger.jsonl``, a
    file is not one of :data:`PUBLIC_LEDGER_FILES`, or a file is larger than
    :data:`MAX_COPY_BYTES`. Nothing a hospital sends can write outside ``run_dir/ledgers``.

    Returns
    -------
    dict
        Site name -> directory written.
    """
    out: dict[str, Path] = {}
    root = Path(run_dir) / "ledgers"
    for node in sorted(replies):
        payload = replies[node]
        site = str(payload.meta.get("site", ""))
        files = payload.meta.get("files")
        if not _NAME.fullmatch(site) or site in out or not isinstance(files, dict):
            continue
        if any(name not in PUBLIC_LEDGER_FILES or not isinstance(data, bytes)
               or len(data) > MAX_COPY_BYTES for name, data in files.items()):
            continue
        if "ledger.jsonl" not in files:
            continue
        dst = root / site
        dst.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (dst / name).write_bytes(data)
        out[site] = dst
    return out
