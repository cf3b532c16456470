"""Where the loop's actors run: one placement group pins the roles, and a role's ranks meet on one node.

Bundles, in order: one per policy rank, one per reward rank (shared with the policy rank of the same index
when ``colocate_learners``: a bundle of twice the size), one per rollout worker. Inside a placement group
already (a Ray Tune trial) nothing is reserved: the trial's group captures the actors.
"""

from __future__ import annotations

import os

import ray

from dense_irl.errors import ConfigError
from dense_irl.runtime.learners import free_port

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def place_roles(cfg) -> tuple[object | None, dict]:
    """Reserve the roles' placement group for a ``LoopConfig``; returns it (or None) and each actor's bundle.

    A group that cannot be placed within ``placement_timeout_s`` is removed and reported clearly.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    strategy = cfg.placement_strategy
    if strategy == "none" or ray.util.get_current_placement_group() is not None:
        return None, {}  # plain scheduling, or a Tune trial's group that captures our actors already
    n, k, shared = cfg.learner.num_workers, cfg.rollout.num_workers, cfg.colocate_learners
    mult = 2 if shared else 1
    learner = {"CPU": mult * cfg.learner.num_cpus_per_worker, "GPU": mult * cfg.learner.num_gpus_per_worker}
    rollout = {"CPU": cfg.rollout.num_cpus_per_worker, "GPU": cfg.rollout.num_gpus_per_worker}
    bundles = [learner] * (n if shared else 2 * n) + [rollout] * k
    bundles = [{r: v for r, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]
    pg = placement_group(bundles, strategy=strategy, name=f"dense-irl-{os.getpid()}")
    try:
        ray.get(pg.ready(), timeout=cfg.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ConfigError(
            f"the roles' placement group ({len(bundles)} bundles {bundles}, strategy {strategy}) could not be "
            f"placed within {cfg.placement_timeout_s:.0f} s; the cluster has {ray.cluster_resources()} "
            f"(available {ray.available_resources()}). Lower learner/rollout num_*_per_worker or add nodes."
        ) from None
    bundle_of = {("policy", r): r for r in range(n)}
    bundle_of |= {("reward", r): r if shared else n + r for r in range(n)}
    bundle_of |= {("rollout", i): (n if shared else 2 * n) + i for i in range(k)}
    return pg, bundle_of


def actor_options(pg, bundle: int | None, num_cpus: float, num_gpus: float) -> dict:
    """``.options(...)`` of an actor: its resources, in its bundle of ``pg`` when there is a group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
    return opts


def rendezvous(pg, bundle: int | None) -> str:
    """Where a group of ranks meets: the node of ``bundle`` (127.0.0.1 without a group), and a free port.

    The port is checked free on this node only; on another node a clash shows as a rendezvous error.
    """
    host = "127.0.0.1"
    if pg is not None:
        from ray.util.placement_group import placement_group_table

        node = placement_group_table(pg)["bundles_to_node_id"][bundle]
        host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)
    return f"{host}:{free_port()}"
