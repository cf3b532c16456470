"""Step rewards -> per-step advantages: a registry of estimators (verl's ``core_algos`` shape).

An estimator takes the dense step rewards of one iteration's samples, their prompt groups and the
chains' steps, and returns one advantage per step. :func:`compute_advantages` then adds the verifier's
outcome term, in this one place for every estimator: the 0/1 outcome is normalised over its group (GRPO)
and, weighted by ``rl.outcome_weight``, added to the advantage of every step, as PRIME (arXiv 2502.01456)
combines implicit process rewards with outcome rewards: on its own scale, so dense rewards of any
magnitude cannot drown it.

- ``group`` (DeepSeekMath's process supervision, arXiv 2402.03300 §4.1.3, with a discount): every step
  reward is normalised by the mean and std of all step rewards of its group (the G samples of one
  prompt); a step's advantage is the discounted sum of the normalised rewards of its own and later steps.
- ``tree``: rollouts of one prompt that share step prefixes form a tree (a node is a step prefix, an edge
  a step). Soft value backups from the leaves, ``V(leaf) = 0``,
  ``V(node) = alpha * log mean_{c in children} exp((R(c) + V(c)) / alpha)``, give the soft advantage of
  every step, ``A(c) = R(c) + V(c) - V(parent)``; the mean runs over the distinct children weighted by how
  many rollouts took each (the empirical policy). Cost is linear in the number of nodes.

Add an estimator with ``@register_advantage_estimator("name")`` and select it with ``rl.advantages: name``.
"""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage_estimator(name: str):
    """Register ``fn(step_rewards, groups, chains, gamma, alpha) -> advantages`` under ``name``."""

    def add(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


def _group_stats(values: list[list[float]], groups: list[int]) -> dict[int, tuple[float, float]]:
    """Mean and (population) std of every value of each group."""
    pooled: dict[int, list[float]] = defaultdict(list)
    for v, g in zip(values, groups):
        pooled[g] += v
    out = {}
    for g, vals in pooled.items():
        mean = sum(vals) / len(vals)
        out[g] = (mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)))
    return out


@register_advantage_estimator("group")
def group_advantages(step_rewards: list[list[float]], groups: list[int], chains=None, gamma: float = 1.0,
                     alpha: float = 1.0, eps: float = 1e-6) -> list[list[float]]:
    """Group-normalised step rewards, then the discounted reward-to-go."""
    stats = _group_stats(step_rewards, groups)
    out = []
    for r, g in zip(step_rewards, groups):
        mean, std = stats[g]
        adv, running = [0.0] * len(r), 0.0
        for k in range(len(r) - 1, -1, -1):
            running = (r[k] - mean) / (std + eps) + gamma * running
            adv[k] = running
        out.append(adv)
    return out


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    visits: dict[str, int] = field(default_factory=dict)
    reward_sum: dict[str, float] = field(default_factory=dict)  # summed over the rollouts taking the edge
    value: float = 0.0


def soft_backup(chains: list[list[str]], step_rewards: list[list[float]], alpha: float = 1.0) -> dict:
    """Soft values over the prefix tree of ``chains`` (steps of one prompt's rollouts).

    Returns ``advantages`` (per chain, per step), ``values`` (V of the prefix before each step, per
    chain) and ``root_value`` (the log-partition estimate of max-ent IRL). The reward of an edge taken by
    several rollouts is their mean (the same step, scored in different contexts only by noise).
    """
    if len(chains) != len(step_rewards):
        raise ValueError(f"{len(chains)} chains but {len(step_rewards)} reward lists")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    # The tree holds no reference cycles (reference counting frees it), but Python's cyclic collector would
    # walk all of its nodes on every full pass: 2.3x the time at 3e5 nodes, more with every node added.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _backup(chains, step_rewards, alpha)
    finally:
        if collecting:
            gc.enable()


def _backup(chains: list[list[str]], step_rewards: list[list[float]], alpha: float) -> dict:
    root = _Node()
    for steps, rewards in zip(chains, step_rewards):
        if len(steps) != len(rewards):
            raise ValueError(f"a chain has {len(steps)} steps but {len(rewards)} rewards")
        node = root
        for step, r in zip(steps, rewards):
            child = node.children.get(step)
            if child is None:  # (not setdefault: that would build a node for every step of every chain)
                child = node.children[step] = _Node()
            node.visits[step] = node.visits.get(step, 0) + 1
            node.reward_sum[step] = node.reward_sum.get(step, 0.0) + r
            node = child

    order, stack = [], [root]  # post-order without recursion (chains can be long)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children.values())
    for n in reversed(order):
        if not n.children:
            n.value = 0.0
            continue
        total = sum(n.visits.values())
        terms = [(math.log(n.visits[s] / total), (n.reward_sum[s] / n.visits[s] + c.value) / alpha)
                 for s, c in n.children.items()]
        top = max(lw + q for lw, q in terms)
        n.value = alpha * (top + math.log(sum(math.exp(lw + q - top) for lw, q in terms)))

    advantages, values = [], []
    for steps in chains:
        node, adv, val = root, [], []
        for step in steps:
            child = node.children[step]
            adv.append(node.reward_sum[step] / node.visits[step] + child.value - node.value)
            val.append(node.value)
            node = child
        advantages.append(adv)
        values.append(val)
    return {"advantages": advantages, "values": values, "root_value": root.value}


@register_advantage_estimator("tree")
def tree_advantages(step_rewards: list[list[float]], groups: list[int], chains: list[list[str]],
                    gamma: float = 1.0, alpha: float = 1.0) -> list[list[float]]:
    """Soft advantages over each group's step tree (:func:`soft_backup`); ``gamma`` is not used."""
    out: list = [None] * len(step_rewards)
    for g in dict.fromkeys(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        tree = soft_backup([chains[i][: len(step_rewards[i])] for i in idx], [step_rewards[i] for i in idx], alpha)
        for i, a in zip(idx, tree["advantages"]):
            out[i] = a
    return out


def outcome_advantages(outcomes: list[float], groups: list[int], eps: float = 1e-6) -> list[float]:
    """The outcome of each chain normalised over its group (GRPO's advantage)."""
    stats = _group_stats([[o] for o in outcomes], groups)
    return [(o - stats[g][0]) / (stats[g][1] + eps) for o, g in zip(outcomes, groups)]


def compute_advantages(estimator: str, step_rewards: list[list[float]], groups: list[int],
                       chains: list[list[str]], *, gamma: float = 1.0, alpha: float = 1.0,
                       outcomes: list[float] | None = None, outcome_weight: float = 0.0) -> list[list[float]]:
    """Per-step advantages by the named estimator, plus ``outcome_weight`` * the group-normalised outcome."""
    if len(step_rewards) != len(groups):
        raise ValueError(f"{len(step_rewards)} chains but {len(groups)} group ids")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    adv = ADVANTAGE_ESTIMATORS[estimator]([list(r) for r in step_rewards], groups, chains, gamma=gamma, alpha=alpha)
    if outcomes is not None and outcome_weight:
        bonus = outcome_advantages(outcomes, groups)
        adv = [[a + outcome_weight * b for a in row] for row, b in zip(adv, bonus)]
    return adv
