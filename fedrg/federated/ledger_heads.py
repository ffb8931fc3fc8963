"""The server's memory of each hospital's signed ledger head (``RUN_DIR/ledger_heads.json``).

Every train/evaluate reply carries the hospital's signed ledger head (entries, last hash,
epsilon, key id). The server keeps the last one per hospital in the run directory (``{"heads": {site: head}, "nodes":
{node: site}}``), sends it
back with the next request (the hospital refuses to train on a ledger that does not extend
it, unless re-initialised explicitly), and reports a head that does not extend the previous
one (the run's ``metrics.json`` ``ledger_alerts`` and the server log); ``fedrg audit`` checks
the exported ledgers against the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedrg.privacy.ledger import head_extends

HEADS_NAME = "ledger_heads.json"


class HeadBook:
    """Last signed ledger head per hospital, persisted in ``run_dir/ledger_heads.json``.

    Parameters
    ----------
    run_dir : path-like
        The run directory (the file is read when present, so a resumed run remembers).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / HEADS_NAME
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            loaded = {}
        if not isinstance(loaded, dict):
            loaded = {}
        self.heads: dict[str, dict[str, Any]] = {
            str(k): v for k, v in (loaded.get("heads") or {}).items() if isinstance(v, dict)}
        #: node id -> site name (so a resumed server sends each node its head)
        self.nodes: dict[str, str] = {str(k): str(v) for k, v in (loaded.get("nodes") or {}).items()}

    def site_of(self, node: int) -> str | None:
        """The site name a node answered with before (None: unknown)."""
        return self.nodes.get(str(node))

    def remember_node(self, node: int, site: str) -> None:
        """Remember which site answers as ``node``."""
        if self.nodes.get(str(node)) != site:
            self.nodes[str(node)] = site
            self._save()

    def get(self, site: str) -> dict[str, Any] | None:
        """The last head ``site`` reported (None when never seen)."""
        return self.heads.get(site)

    def observe(self, site: str, head: Any, *, round_: int) -> dict[str, Any] | None:
        """Record ``head`` for ``site``; an alert dict when it does not extend the last one.

        Returns
        -------
        dict | None
            ``{"round", "site", "message", "reinitialised"}`` or None.
        """
        if not isinstance(head, dict) or "entries" not in head:
            return None
        known = self.heads.get(site)
        alert = None
        if known is not None and int(known.get("entries", 0) or 0) > 0:
            ok, why = head_extends(known, head)
            if not ok:
                reinit = int(head.get("reinit_seq", -1)) >= 0
                alert = {"round": int(round_), "site": site, "reinitialised": reinit,
                         "message": f"{site}: ledger does not extend the last head this server "
                         f"saw: {why}" + ("; the hospital re-initialised its ledger explicitly"
                                          if reinit else "")}
                if not reinit:
                    # keep the old head: it goes back with the next request, so the hospital
                    # keeps refusing until it re-initialises explicitly
                    return alert
        self.heads[site] = {k: v for k, v in head.items()}
        self._save()
        return alert

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"heads": self.heads, "nodes": self.nodes}, indent=2,
                                  sort_keys=True))
        os.replace(tmp, self.path)
