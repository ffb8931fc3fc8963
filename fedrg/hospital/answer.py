"""One hospital message answered: the dispatch shared by the ClientApp and the hospital worker.

Flower-free. ``answer(action, site, payload, state)`` is what the hospital does with one server
message, whether it runs inside the ClientApp process Flower starts or inside the hospital's
long-lived worker (:mod:`fedrg.hospital.worker`), so the same policy checks run either way.
"""

from __future__ import annotations

from fedrg.config import SiteConfig
from fedrg.payload import Payload
from fedrg.secagg.stages import ACTION_PREFIX


def answer(action: str, site: SiteConfig, payload: Payload, state: Payload) -> Payload:
    """The hospital's reply to ``action``; ``state`` (kept by the caller) is updated in place.

    Parameters
    ----------
    action
        A fedrg action (``train``, ``evaluate``, ``secagg_*``, ``ledger``).
    site
        The hospital's own site config (never from the server).
    payload
        The server's request.
    state
        What the hospital keeps between messages of one run.

    Raises
    ------
    FedrgError
        Whatever the hospital refuses (policy, budget, bad request, cohort problems).
    """
    from fedrg.hospital.run_end import clear_run_end, note_run_end

    if action == "ledger":
        # only the public files an auditor needs (never the signing key); the server's
        # last message of a run: `fedrg client` then knows a shutdown is the normal end
        from fedrg.hospital.ledger_copy import public_ledger_payload

        reply = public_ledger_payload(site.state_dir, site.name)
        note_run_end(site.state_dir)
        return reply
    clear_run_end(site.state_dir)
    if action.startswith(ACTION_PREFIX):
        # no torch / model import: a fresh ClientApp process answers these quickly
        from fedrg.hospital.secure import client_stage

        return client_stage(action, payload, state, site=site)
    from fedrg.hospital.site import get_site  # heavy imports stay out of app loading

    return get_site(site).handle(action, payload, state)

