"""SecAggStage: the one vocabulary of the secure-aggregation stages."""

from __future__ import annotations

import pytest
from secagg_driver import DROP_STAGES

from fedrg.secagg.client import STAGES
from fedrg.secagg.stages import SecAggStage


def test_stages_in_protocol_order_and_every_vocabulary_derives_from_them():
    from fedrg.flower.transport import ACTIONS

    assert [s.value for s in SecAggStage] == ["setup", "share", "masked", "consistency", "unmask"]
    assert tuple(s.value for s in SecAggStage) == DROP_STAGES
    assert ("new", *DROP_STAGES) == STAGES
    secagg_actions = {a: t for a, t in ACTIONS.items() if a.startswith("secagg_")}
    assert secagg_actions == {f"secagg_{s.value}": f"train.secagg_{s.value}" for s in SecAggStage}


def test_a_stage_behaves_as_its_value():
    stage = SecAggStage.MASKED
    assert stage == "masked" and f"{stage}" == "masked" and str(stage) == "masked"
    assert {"masked": 1}[stage] == 1 and stage in {"masked"}
    assert SecAggStage.from_action("secagg_masked") is stage


@pytest.mark.parametrize("action", ["secagg_mask", "train", "secagg_", "setup"])
def test_an_unknown_action_is_refused_naming_the_known_ones(action):
    with pytest.raises(ValueError, match="secagg_setup, secagg_share"):
        SecAggStage.from_action(action)
