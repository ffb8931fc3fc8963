"""The stages of the secure-aggregation protocol, named once (as Flower does for SecAgg+).

Every vocabulary derives from :class:`SecAggStage`: the server state machine
(:class:`~fedrg.secagg.server.ServerAggregator`), the simulation driver's ``drop_at`` keys,
the hospital's message actions (``secagg_<stage>``, :mod:`fedrg.federated.secure`) and the
Flower message types (``train.secagg_<stage>``, :mod:`fedrg.flower.transport`).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ACTION_PREFIX", "SecAggStage"]

#: Prefix of the hospital-side action names of the protocol messages.
ACTION_PREFIX = "secagg_"


class SecAggStage(str, Enum):
    """The five message rounds of one secure sum, in protocol order.

    A member compares and formats as its value (``SecAggStage.SETUP == "setup"``).
    """

    SETUP = "setup"  # 1. signed round keys
    SHARE = "share"  # 2. encrypted Shamir shares of the mask seeds
    MASKED = "masked"  # 3. the masked update
    CONSISTENCY = "consistency"  # 4. signatures over the survivor set
    UNMASK = "unmask"  # 5. shares that remove the masks

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:  # equal to its value, so hash like it (dict keys, sets)
        return hash(self.value)

    @property
    def action(self) -> str:
        """The hospital action that answers this stage (``secagg_<stage>``)."""
        return ACTION_PREFIX + self.value

    @property
    def message_type(self) -> str:
        """The Flower message type that carries this stage (``train.secagg_<stage>``)."""
        return "train." + self.action

    @classmethod
    def from_action(cls, action: str) -> SecAggStage:
        """The stage an action names.

        Raises
        ------
        ValueError
            When ``action`` is not ``secagg_<stage>`` for one of the five stages.
        """
        if action.startswith(ACTION_PREFIX):
            try:
                return cls(action[len(ACTION_PREFIX):])
            except ValueError:
                pass
        raise ValueError(f"{action!r} is not a secure-aggregation action (one of "
                         f"{', '.join(s.action for s in cls)})")
