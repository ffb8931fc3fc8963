"""Secure aggregation (SecAgg+-style): masked, dropout-tolerant sums of client updates.

Pure Python + numpy + ``cryptography``; no torch, no Flower, no I/O. The Flower glue in
:mod:`fedrg.federated.secure` calls the five message-shaped stages of :class:`ClientSession` and
:class:`ServerAggregator`. See ``docs/secure-aggregation.md``.
"""

from fedrg.secagg.client import ClientSession, ClientTrust
from fedrg.secagg.params import RoundParams, auto_neighbours, default_threshold, neighbour_graph
from fedrg.secagg.quantize import error_bound
from fedrg.secagg.roster import Roster, RosterEntry, SigningIdentity, load_roster, write_roster
from fedrg.secagg.server import AggregateResult, ServerAggregator
from fedrg.secagg.stages import SecAggStage

__all__ = [
    "AggregateResult",
    "ClientSession",
    "ClientTrust",
    "Roster",
    "RosterEntry",
    "RoundParams",
    "SecAggStage",
    "ServerAggregator",
    "SigningIdentity",
    "auto_neighbours",
    "default_threshold",
    "error_bound",
    "load_roster",
    "neighbour_graph",
    "write_roster",
]
