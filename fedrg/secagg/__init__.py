"""Secure aggregation (SecAgg+-style): masked, dropout-tolerant sums of client updates.

Pure Python + numpy + ``cryptography``; no torch, no Flower, no I/O. The Flower glue in
:mod:`fedrg.flower` calls the four message-shaped stages of :class:`ClientSession` and
:class:`ServerAggregator`. See ``docs/secure-aggregation.md``.
"""

from fedrg.secagg.client import ClientSession
from fedrg.secagg.driver import message_nbytes, run_secure_aggregation
from fedrg.secagg.params import RoundParams, default_threshold, neighbour_graph
from fedrg.secagg.quantize import error_bound
from fedrg.secagg.server import AggregateResult, ServerAggregator

__all__ = [
    "AggregateResult",
    "ClientSession",
    "RoundParams",
    "ServerAggregator",
    "default_threshold",
    "error_bound",
    "message_nbytes",
    "neighbour_graph",
    "run_secure_aggregation",
]
