"""An in-process transport: real hospital sites called directly, without Flower or Ray.

Useful to debug a federation in one process and to test the hospital side quickly; the
product path is Flower (``fedrg.flower``), which carries exactly the same payloads.
"""

from __future__ import annotations

import logging

from fedrg.config import SiteConfig
from fedrg.data.loader import CohortLoader
from fedrg.errors import FedrgError
from fedrg.hospital.site import HospitalSite
from fedrg.model.factory import ModelFactory
from fedrg.payload import Payload, Reply

log = logging.getLogger("fedrg.local")


class LocalTransport:
    """Node ``i + 1`` is ``sites[i]``; each node keeps its own state between messages."""

    def __init__(self, sites: list[SiteConfig], *, model_factory: ModelFactory | None = None,
                 cohort_loader: CohortLoader | None = None) -> None:
        """``model_factory`` and ``cohort_loader`` are handed to every :class:`HospitalSite`."""
        self.sites = {i + 1: HospitalSite(s, model_factory=model_factory, cohort_loader=cohort_loader)
                      for i, s in enumerate(sites)}
        self.state = {node: Payload() for node in self.sites}

    def nodes(self) -> list[int]:
        return sorted(self.sites)

    def send(self, action: str, messages: dict[int, Payload], *, round_: int,
             timeout: float | None = None) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        for node, payload in messages.items():
            try:
                out[node] = Reply(node, self.sites[node].handle(action, payload, self.state[node]))
            except FedrgError as err:
                log.warning("node %s %s failed: %s", node, action, err)
                out[node] = Reply(node, error=err.public_message())
        return out
