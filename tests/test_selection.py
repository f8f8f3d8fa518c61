"""The paper's candidate rule at its boundaries (r_policy < gamma_low and max r_expert > gamma_high)."""

import pytest

from cso_lib.stages.score_alternatives import decide

pytestmark = pytest.mark.slow

GL, GH = 0.45, 0.65


def _decisions(spark, policy, alts):
    p = spark.createDataFrame(policy, "trajectory_id string, step_idx int, score double")
    a = spark.createDataFrame(alts, "trajectory_id string, step_idx int, alt_idx int, score double")
    return {r["trajectory_id"]: r.asDict() for r in decide(p, a, GL, GH).collect()}


def test_rule_at_its_boundaries(spark):
    policy = [
        ("at_low", 0, 0.45), ("below_low", 0, 0.4499), ("at_high", 0, 0.1), ("above_high", 0, 0.1),
        ("unscored", 0, None), ("no_alts", 0, 0.2), ("zero", 0, 0.0),
    ]
    alts = [
        ("at_low", 0, 0, 0.9), ("below_low", 0, 0, 0.9), ("at_high", 0, 0, 0.65), ("at_high", 0, 1, 0.3),
        ("above_high", 0, 0, 0.6501), ("unscored", 0, 0, 0.99), ("zero", 0, 0, 1.0),
    ]
    d = _decisions(spark, policy, alts)
    assert {k for k, v in d.items() if v["is_candidate"]} == {"below_low", "above_high", "zero"}
    assert d["at_low"]["reason"] == "r_policy 0.450 >= gamma_low 0.45"
    assert d["at_high"]["reason"] == "max r_expert 0.650 <= gamma_high 0.65"
    assert d["unscored"]["reason"] == "policy action unscored" and not d["unscored"]["is_candidate"]
    assert d["no_alts"]["reason"] == "no scored alternatives" and d["no_alts"]["high_alt_idxs"] == []
    assert d["below_low"]["reason"] == "r_policy 0.450 < 0.45 and max r_expert 0.900 > 0.65"
    assert d["at_high"]["high_alt_idxs"] == [] and d["above_high"]["high_alt_idxs"] == [0]


def test_high_alternatives_ordered_by_score_and_ties_pick_lowest(spark):
    alts = [("t", 3, 0, 0.7), ("t", 3, 1, 0.95), ("t", 3, 2, 0.95), ("t", 3, 3, 0.5), ("t", 3, 4, 0.8)]
    d = _decisions(spark, [("t", 3, 0.2)], alts)["t"]
    assert d["is_candidate"] and d["max_r_expert"] == 0.95 and d["best_alt_idx"] == 1
    assert d["high_alt_idxs"] == [1, 2, 4, 0]
