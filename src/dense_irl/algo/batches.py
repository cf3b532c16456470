"""The typed messages of one IRL iteration, between the driver, its actors and the loss functions.

    Rollout      one sampled completion (its steps, token ids, behaviour log-probs)
    Negative     a chain labelled "not expert", with how many leading steps it shares with its expert
    RewardBatch  experts + negatives: one reward step's data
    Experience   rollouts + their per-step advantages + the demonstrations for PPO-ptx: one policy update
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dense_irl.data.layout import Chain, prompt_ids, token_steps


@dataclass
class Rollout:
    """One completion sampled by a rollout engine for ``prompt``.

    ``prompt_ids``: the ids the engine continued from (``data.layout.prompt_ids``); ``token_ids``: the sampled
    ones, the closing ``</s>`` included when the chain finished.
    """

    prompt: str
    completion: str
    steps: list[str]
    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each sampled token
    finished: bool
    policy_version: int = 0
    prompt_ids: list[int] | None = None  # None: not recorded (built by hand)


@dataclass
class Negative:
    """A chain labelled "not expert": a policy sample or a perturbed expert.

    ``shared``: how many leading steps equal its prompt's demonstration (where it leaves the expert's path), or
    more generally count as right: a policy continuation labelled at its first error counts its steps before
    that error (``reward.policy_negatives_label: first_error``).
    ``label_all``: every step after the shared ones counts in the discriminator loss, not only the divergent
    one (``reward.divergence_only`` is for perturbed experts, whose later steps are right given the error): a
    policy's continuation of an expert prefix, whose every step is the policy's. ``finished`` False: the
    chain stopped at a token limit, so its last step is closed by the separator, not ``</s>``.
    """

    prompt: str
    steps: list[str]
    shared: int = 0
    label_all: bool = False
    finished: bool = True


@dataclass
class RewardBatch:
    """One reward step's data: experts (label 1) and negatives (label 0)."""

    experts: list[Chain]
    negatives: list[Negative] = field(default_factory=list)

    def chains(self) -> list[Chain]:
        """Every chain in loss order: experts, then negatives."""
        return list(self.experts) + [(n.prompt, n.steps) for n in self.negatives]

    def shard(self, n: int) -> list[RewardBatch]:
        """``n`` data-parallel shards (rank r gets every n-th expert and negative)."""
        return [RewardBatch(self.experts[r::n], self.negatives[r::n]) for r in range(n)]


@dataclass
class Experience:
    """One policy update's data: the rollouts, each step's advantage, and the demonstrations for PPO-ptx."""

    rollouts: list[Rollout]
    advantages: list[list[float]]  # per rollout, per step
    experts: list[Chain] = field(default_factory=list)

    def __post_init__(self):
        if len(self.rollouts) != len(self.advantages):
            raise ValueError(f"{len(self.rollouts)} rollouts but {len(self.advantages)} advantage lists")

    def shard(self, n: int) -> list[Experience]:
        """``n`` data-parallel shards."""
        return [Experience(self.rollouts[r::n], self.advantages[r::n], self.experts[r::n]) for r in range(n)]

    def tensors(self, tokenizer, separator: str, device) -> dict[str, torch.Tensor]:
        """Prompt + completion ids (the rollout engine's own), behaviour log-probs and token advantages (B, T).

        The prompt ids are the layout's (``data.layout.prompt_ids``), the ones the reward model and the
        demonstrations' rows start with; a rollout that continued from other ids (an engine whose tokenizer
        differs from the learner's) is an error, not a silent mismatch. A token's advantage is its step's
        (``data.layout.token_steps``); ``mask`` marks completion tokens.
        """
        rows = []
        for r, adv in zip(self.rollouts, self.advantages):
            head = prompt_ids(tokenizer, r.prompt, separator)
            if r.prompt_ids is not None and list(r.prompt_ids) != head:
                raise ValueError(
                    f"a rollout of prompt {r.prompt[:60]!r} continued from {len(r.prompt_ids)} token ids that are "
                    f"not the layout's {len(head)} (data.layout.prompt_ids): the rollout engine and the learner "
                    "tokenise differently; give both the same tokenizer files"
                )
            adv = adv or [0.0]
            token_adv = [adv[min(k, len(adv) - 1)] for k in token_steps(tokenizer, r.token_ids, separator)]
            rows.append((head, list(r.token_ids), list(r.logprobs), token_adv))
        B, T = len(rows), max(len(p) + len(c) for p, c, _, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = {"input_ids": torch.full((B, T), pad, dtype=torch.long),
               "attention_mask": torch.zeros((B, T), dtype=torch.long), "old_logp": torch.zeros((B, T)),
               "advantages": torch.zeros((B, T)), "mask": torch.zeros((B, T), dtype=torch.bool)}
        for b, (prompt, comp, logps, token_adv) in enumerate(rows):
            n, m = len(prompt), len(comp)
            out["input_ids"][b, : n + m] = torch.tensor(prompt + comp, dtype=torch.long)
            out["attention_mask"][b, : n + m] = 1
            out["old_logp"][b, n : n + m] = torch.tensor(logps[:m])
            out["advantages"][b, n : n + m] = torch.tensor(token_adv)
            out["mask"][b, n : n + m] = True
        return {k: v.to(device) for k, v in out.items()}
