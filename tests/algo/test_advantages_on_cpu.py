"""Advantages from dense step rewards: the estimators of ``dense_irl.algo.advantages`` on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from dense_irl.algo.advantages import compute_advantages, soft_backup


def test_step_advantages_normalise_per_group_and_discount():
    rewards = [[1.0, 3.0], [3.0, 1.0], [10.0, 10.0]]
    adv = compute_advantages("group", rewards, [0, 0, 1], [["a", "b"]] * 3, gamma=0.5)
    # group 0 pools 1,3,3,1: mean 2, std 1 -> normalised [-1, 1] and [1, -1]
    assert adv[0] == pytest.approx([-1 + 0.5 * 1, 1], abs=1e-5)
    assert adv[1] == pytest.approx([1 + 0.5 * -1, -1], abs=1e-5)
    # a constant group has no signal: advantages 0
    assert adv[2] == pytest.approx([0.0, 0.0], abs=1e-5)


def test_outcome_advantage_is_group_normalised_and_added_to_every_step():
    adv = compute_advantages("group", [[0.0, 0.0], [0.0, 0.0]], [0, 0], [["a", "b"]] * 2, outcomes=[1.0, 0.0],
                             outcome_weight=2.0)
    assert adv[0] == pytest.approx([2.0, 2.0], abs=1e-4) and adv[1] == pytest.approx([-2.0, -2.0], abs=1e-4)
    # on its own scale: huge dense rewards do not drown it
    adv = compute_advantages("group", [[100.0], [-100.0]], [0, 0], [["a"], ["b"]], outcomes=[0.0, 1.0],
                             outcome_weight=1.0)
    assert adv[0][0] == pytest.approx(0.0, abs=1e-4) and adv[1][0] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="group ids"):
        compute_advantages("group", [[1.0]], [0, 1], [["a"]])


def test_soft_backup_on_a_small_tree():
    chains = [["a", "b"], ["a", "c"], ["d"]]
    rewards = [[1.0, 2.0], [1.0, 0.0], [0.5]]
    out = soft_backup(chains, rewards, alpha=1.0)
    v_a = math.log(0.5 * math.exp(2.0) + 0.5 * math.exp(0.0))
    v_root = math.log((2 / 3) * math.exp(1.0 + v_a) + (1 / 3) * math.exp(0.5))
    assert out["root_value"] == pytest.approx(v_root)
    assert out["values"][0] == pytest.approx([v_root, v_a])
    assert out["advantages"][0] == pytest.approx([1.0 + v_a - v_root, 2.0 - v_a])
    assert out["advantages"][2] == pytest.approx([0.5 - v_root])


def test_soft_backup_tends_to_max_as_alpha_shrinks_and_mean_as_it_grows():
    chains, rewards = [["x"], ["y"]], [[1.0], [3.0]]
    assert soft_backup(chains, rewards, alpha=1e-3)["root_value"] == pytest.approx(3.0, abs=1e-2)
    assert soft_backup(chains, rewards, alpha=1e4)["root_value"] == pytest.approx(2.0, abs=1e-2)
    with pytest.raises(ValueError, match="alpha"):
        soft_backup(chains, rewards, alpha=0.0)
    with pytest.raises(ValueError, match="rewards"):
        soft_backup([["x", "y"]], [[1.0]])


def test_tree_estimator_groups_by_prompt_and_takes_the_outcome_in_the_same_place():
    chains = [["a", "b"], ["a", "c"], ["x"], ["y"]]
    rewards = [[1.0, 2.0], [1.0, 0.0], [0.0], [1.0]]
    groups = [0, 0, 1, 1]
    adv = compute_advantages("tree", rewards, groups, chains, alpha=1.0)
    g0 = soft_backup(chains[:2], rewards[:2])["advantages"]
    g1 = soft_backup(chains[2:], rewards[2:])["advantages"]
    assert adv == [pytest.approx(a) for a in g0 + g1]
    # the outcome term: group-normalised, weighted, added to every step, for any estimator
    with_outcome = compute_advantages("tree", rewards, groups, chains, outcomes=[1.0, 0.0, 0.0, 0.0],
                                      outcome_weight=0.5)
    bonus = [0.5, -0.5, 0.0, 0.0]
    for a, b, w in zip(with_outcome, adv, bonus):
        assert a == pytest.approx([x + w for x in b], abs=1e-4)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("gae", rewards, groups, chains)


def test_a_registered_estimator_is_selectable():
    from dense_irl.algo.advantages import ADVANTAGE_ESTIMATORS, register_advantage_estimator

    @register_advantage_estimator("last_step_only")
    def last_only(step_rewards, groups, chains, gamma=1.0, alpha=1.0):
        return [[0.0] * (len(r) - 1) + [r[-1]] for r in step_rewards]

    try:
        assert compute_advantages("last_step_only", [[1.0, 2.0]], [0], [["a", "b"]]) == [[0.0, 2.0]]
    finally:
        del ADVANTAGE_ESTIMATORS["last_step_only"]
