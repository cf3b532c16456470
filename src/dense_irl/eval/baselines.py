"""The reward models dense-irl is compared with: both trained from outcome labels only, both from the SFT model.

- **Implicit PRM** (Yuan et al. 2024, "Free process rewards without process labels"): a causal LM ``pi``
  trained so that ``beta * sum_t log(pi/pi_ref)`` over a chain is the logit of "the chain is correct"
  (BCE on outcome labels); the reward of step k is ``beta * sum_{t in step k} log(pi/pi_ref)``.
- **Outcome reward model (ORM)**: the backbone plus a scalar value head, trained with BCE on the
  outcome label at the end of the chain; the score of step k is the head's value after step k (the
  value of the prefix), the usual way an ORM is read at step level.

The outcome labels come from the same chains the IRL reward model sees (experts are correct, perturbed
experts are not), so every learner gets the same data; only the IRL model learns without a verifier.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from dense_irl.algo.experience import perturbed_negatives
from dense_irl.algo.optim import Optimizer
from dense_irl.algo.sft import budget
from dense_irl.data.layout import encode_chains, sum_by_step
from dense_irl.eval.localisation import with_layout
from dense_irl.models.chains import token_logprobs


def _batches(demos, kinds, batch_size: int, minutes: float, max_steps: int, seed: int, progress: str | None = None):
    """Yield (chains, labels): half experts (1), half perturbed experts (0), until time or steps run out.
    ``progress``: the label of a tqdm bar over the steps (None: none)."""
    rng = random.Random(seed)
    for _ in budget(progress, max_steps, minutes):
        experts = rng.sample(demos, min(batch_size // 2, len(demos)))
        negatives = perturbed_negatives(experts, kinds, rng)
        chains = [(d.prompt, d.steps) for d in experts] + [(n.prompt, n.steps) for n in negatives]
        yield chains, torch.tensor([1.0] * len(experts) + [0.0] * len(negatives))


def _score_fn(step_values, tokenizer, max_length: int, separator: str, steps: int, batch_size: int = 64,
              device="cpu"):
    """A ScoreFn (chains -> per-step scores) from ``step_values(encoded batch on device) -> (B, S)``; ``.steps``:
    the training steps taken. A chain longer than ``max_length`` is scored on the steps that fit; the scorer
    carries its layout (``localisation.with_layout``) so evaluations count those chains up front."""

    @torch.no_grad()
    def score(chains):
        out = []
        for i in range(0, len(chains), batch_size):
            enc = encode_chains(tokenizer, chains[i : i + batch_size], max_length, separator).to(device)
            v = step_values(enc).float().cpu()
            out += [v[b, : enc.n_steps[b]].tolist() for b in range(len(enc.n_steps))]
        return out

    score.steps = steps
    return with_layout(score, tokenizer, max_length, separator)


def _step_logratio(pi, ref, enc) -> torch.Tensor:
    """(B, S) summed log(pi/pi_ref) of every step's tokens."""
    ids, mask = enc.input_ids, enc.attention_mask
    lp = token_logprobs(pi(input_ids=ids, attention_mask=mask).logits, ids)
    with torch.no_grad():
        lr = token_logprobs(ref(input_ids=ids, attention_mask=mask).logits, ids)
    return sum_by_step(lp - lr, enc.step_ids, enc.step_mask.shape[1])


def train_implicit_prm(sft_policy, tokenizer, demos, kinds, *, beta: float = 0.05, lr: float = 5e-4,
                       batch_size: int = 32, minutes: float = 0.0, max_steps: int = 300,
                       max_length: int = 256, separator: str = "\n", seed: int = 0, progress: str | None = None,
                       score_batch_size: int = 64):
    """Train an implicit PRM from ``sft_policy`` (also its frozen reference); returns its ScoreFn, which also
    carries ``.model`` (the trained pi), ``.reference`` and ``.beta``: its step score is ``beta *`` (pi's step
    log-prob - the reference's), so a caller that already has the reference's step log-probs can reuse them."""
    pi, ref = copy.deepcopy(sft_policy).train(), copy.deepcopy(sft_policy).eval().requires_grad_(False)
    device = next(pi.parameters()).device  # trained where the SFT policy lives
    opt = Optimizer(pi.parameters(), lr)
    steps = 0
    for chains, labels in _batches(demos, kinds, batch_size, minutes, max_steps, seed, progress):
        steps += 1
        enc = encode_chains(tokenizer, chains, max_length, separator).to(device)
        logit = beta * (_step_logratio(pi, ref, enc) * enc.step_mask).sum(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logit, labels.to(device))
        opt.step(loss)
    pi.eval()
    score = _score_fn(lambda enc: beta * _step_logratio(pi, ref, enc), tokenizer, max_length, separator, steps,
                      score_batch_size, device)
    score.model, score.reference, score.beta = pi, ref, beta
    return score


class OutcomeRewardModel(nn.Module):
    """Backbone + a scalar value head read at the end of every step."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, enc) -> torch.Tensor:
        """(B, S) value of every step's prefix (the head on the step's last token)."""
        hidden = self.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                               output_hidden_states=True).hidden_states[-1]
        values = self.head(hidden)[..., 0]
        return values.gather(1, enc.step_end)


def train_orm(sft_policy, tokenizer, demos, kinds, *, lr: float = 5e-4, batch_size: int = 32,
              minutes: float = 0.0, max_steps: int = 300, max_length: int = 256, separator: str = "\n",
              seed: int = 0, progress: str | None = None, score_batch_size: int = 64):
    """Train an outcome reward model from the SFT backbone; returns its ScoreFn (prefix values)."""
    device = next(sft_policy.parameters()).device  # trained where the SFT policy lives
    orm = OutcomeRewardModel(copy.deepcopy(sft_policy)).to(device).train()
    opt = Optimizer(orm.parameters(), lr)
    steps = 0
    for chains, labels in _batches(demos, kinds, batch_size, minutes, max_steps, seed, progress):
        steps += 1
        enc = encode_chains(tokenizer, chains, max_length, separator).to(device)
        values = orm(enc)
        last = values.gather(1, (enc.step_mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(last, labels.to(device))
        opt.step(loss)
    orm.eval()
    score = _score_fn(orm, tokenizer, max_length, separator, steps, score_batch_size, device)
    score.model = orm
    return score
