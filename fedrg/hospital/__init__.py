"""Everything that runs at a hospital, and nothing else.

The hospital answers server messages (:mod:`~fedrg.hospital.answer`, :mod:`~fedrg.hospital.site`),
plans each message once from its own policy (:mod:`~fedrg.hospital.plan`), trains and releases
under that plan, and takes part in the secure sum (:mod:`~fedrg.hospital.secure`). No Flower
imports; the server (:mod:`fedrg.federated`) imports the wire names it shares with the hospital
from here, never the reverse.
"""
