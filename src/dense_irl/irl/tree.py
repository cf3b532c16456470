"""Approximate dynamic programming over the step tree (DESIGN §4).

Rollouts of one prompt that share step prefixes form a tree: a node is a step prefix, an edge is a
step. Soft value backups from the leaves,

    V(leaf) = 0,    V(node) = alpha * log mean_{c in children} exp((R(c) + V(c)) / alpha),

give the soft advantage of every step, ``A(c) = R(c) + V(c) - V(parent)``, the partition-function term
of max-ent IRL (``V(root)``), and a regression target for the potential ``h`` (``V`` at each node).
The mean runs over the distinct children, weighted by how many rollouts took each one (the empirical
policy). Cost is linear in the number of nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    visits: dict[str, int] = field(default_factory=dict)
    reward: dict[str, list[float]] = field(default_factory=dict)  # rewards of the edge, one per rollout
    value: float = 0.0


def soft_backup(chains: list[list[str]], step_rewards: list[list[float]], alpha: float = 1.0) -> dict:
    """Soft values over the prefix tree of ``chains`` (steps of one prompt's rollouts).

    Returns ``advantages`` (per chain, per step), ``values`` (V of the prefix before each step, per
    chain) and ``root_value`` (the log-partition estimate). The reward of an edge taken by several
    rollouts is their mean (they are the same step, scored in different contexts only by noise).
    """
    if len(chains) != len(step_rewards):
        raise ValueError(f"{len(chains)} chains but {len(step_rewards)} reward lists")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    root = _Node()
    for steps, rewards in zip(chains, step_rewards):
        if len(steps) != len(rewards):
            raise ValueError(f"a chain has {len(steps)} steps but {len(rewards)} rewards")
        node = root
        for step, r in zip(steps, rewards):
            node.children.setdefault(step, _Node())
            node.visits[step] = node.visits.get(step, 0) + 1
            node.reward.setdefault(step, []).append(r)
            node = node.children[step]

    # Post-order without recursion (chains can be long).
    order, stack = [], [root]
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children.values())
    for n in reversed(order):
        if not n.children:
            n.value = 0.0
            continue
        total = sum(n.visits.values())
        terms = [(math.log(n.visits[s] / total), (sum(n.reward[s]) / len(n.reward[s]) + c.value) / alpha)
                 for s, c in n.children.items()]
        top = max(lw + q for lw, q in terms)
        n.value = alpha * (top + math.log(sum(math.exp(lw + q - top) for lw, q in terms)))

    advantages, values = [], []
    for steps in chains:
        node, adv, val = root, [], []
        for step in steps:
            child = node.children[step]
            r = sum(node.reward[step]) / len(node.reward[step])
            adv.append(r + child.value - node.value)
            val.append(node.value)
            node = child
        advantages.append(adv)
        values.append(val)
    return {"advantages": advantages, "values": values, "root_value": root.value}
