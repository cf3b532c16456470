"""What an IRL step is made of: the demonstrations' split and order, and the negatives of the reward model.

The only label is "expert or not" per chain. Negatives are perturbed experts (one applicable perturbation
drawn at random) and, online, the policy's own samples; each knows how many leading steps it shares with
its prompt's demonstration, so the loss can leave those expert steps out (``reward.mask_expert_prefix``).
"""

from __future__ import annotations

import random

from dense_irl.algo.batches import Negative, RewardBatch, Rollout
from dense_irl.data.perturb import perturb
from dense_irl.data.schema import Demonstration


def split_demos(demos: list[Demonstration], calibration_chains: int, seed: int
                ) -> tuple[list[Demonstration], list[Demonstration]]:
    """``(calibration, train)``: a seeded shuffle, then at most a fifth held out to calibrate thresholds."""
    demos = list(demos)
    random.Random(seed).shuffle(demos)
    n_cal = min(calibration_chains, len(demos) // 5)
    return demos[:n_cal], demos[n_cal:]


def next_prompts(demos: list, cursor: dict, n: int, seed: int) -> tuple[list, dict]:
    """The next ``n`` demonstrations of a seeded per-epoch order; the cursor makes resumes exact."""
    epoch, pos = cursor["epoch"], cursor["pos"]
    out = []
    while len(out) < n:
        order = list(range(len(demos)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = order[pos : pos + n - len(out)]
        out += [demos[i] for i in take]
        pos += len(take)
        if pos >= len(demos):
            epoch, pos = epoch + 1, 0
    return out, {"epoch": epoch, "pos": pos}


def shared_prefix(steps: list[str], expert_steps: list[str]) -> int:
    """How many leading steps of ``steps`` equal the expert's (where a negative leaves the expert's path)."""
    n = 0
    for a, b in zip(steps, expert_steps):
        if a != b:
            break
        n += 1
    return n


def perturbed_negatives(demos: list[Demonstration], kinds: list[str], rng: random.Random) -> list[Negative]:
    """One perturbed chain per expert, of a kind drawn at random among those that apply to it."""
    out = []
    for demo in demos:
        for kind in rng.sample(list(kinds), len(kinds)):
            res = perturb(demo, kind, rng)
            if res is not None:
                out.append(Negative(demo.prompt, res[0], shared_prefix(res[0], demo.steps)))
                break
    return out


def policy_negatives(samples: list[tuple[Demonstration, Rollout]]) -> list[Negative]:
    """Policy samples as negatives, each with the steps it shares with its prompt's demonstration."""
    return [Negative(d.prompt, r.steps, shared_prefix(r.steps, d.steps)) for d, r in samples]


def online_reward_batch(train: list[Demonstration], samples: list[tuple[Demonstration, Rollout]],
                        batch_size: int, negative_mix: float, kinds: list[str], rng: random.Random) -> RewardBatch:
    """One online reward step: ``batch_size`` experts drawn from all demonstrations (AIRL samples expert data
    apart from the policy's batch) and as many negatives, a ``negative_mix`` share of them perturbed experts
    and the rest drawn from this iteration's policy ``samples``."""
    experts = rng.sample(train, min(batch_size, len(train)))
    n_pert = round(negative_mix * len(experts))
    negatives = policy_negatives(rng.sample(samples, min(len(experts) - n_pert, len(samples))))
    negatives += perturbed_negatives(experts[:n_pert], kinds, rng)
    return RewardBatch([(d.prompt, d.steps) for d in experts], negatives)
