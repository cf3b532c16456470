"""models.branching: negatives run from where they leave their expert, over its key/value cache, with the
log-probs of a pass over each whole chain."""

from __future__ import annotations

import random

import pytest
import torch

from dense_irl.algo.batches import Negative, RewardBatch
from dense_irl.algo.experience import perturbed_negatives
from dense_irl.algo.losses import loss_chains
from dense_irl.data.perturb import KINDS
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.branching import family_step_logprobs
from dense_irl.models.chains import step_logprobs
from dense_irl.models.factory import ModelConfig, load_policy
from dense_irl.offline.config import OfflineRewardConfig

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def setup():
    demos = generate(SyntheticConfig(n_problems=12, seed=2))
    model, tok = load_policy(TINY, [d.prompt for d in demos] + [s for d in demos for s in d.steps], seed=0)
    return demos, model.eval().requires_grad_(False), tok


def _batch(demos):
    rng = random.Random(1)
    experts = [(d.prompt, d.steps) for d in demos[:5]]
    negatives = [n for d in demos[:5] for n in perturbed_negatives([d], list(KINDS), rng)]
    # a policy sample shares only the prompt; a negative of a prompt with no expert here runs whole
    negatives += [Negative(demos[0].prompt, ["9 + 9 = 18", "answer 18"], label_all=True, finished=False),
                  Negative(demos[7].prompt, demos[7].steps[:1])]
    return RewardBatch(experts, negatives)


@pytest.mark.parametrize("max_tokens", [0, 60])
def test_family_log_probs_equal_a_pass_over_each_whole_chain(setup, max_tokens):
    demos, model, tok = setup
    batch = _batch(demos)
    chains, finished = loss_chains(batch, OfflineRewardConfig())
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        whole = step_logprobs(model, tok, chains, 256, "\n", finished=finished, max_tokens=max_tokens)
        n_whole = sum(calls)
        calls.clear()
        cache: dict = {}
        got = family_step_logprobs(model, tok, chains, 256, "\n", cache, finished, max_tokens, len(batch.experts))
        tokens = sum(calls)
        assert family_step_logprobs(model, tok, chains, 256, "\n", cache, finished, max_tokens,
                                    len(batch.experts)) == got
        assert sum(calls) == tokens  # the second call is all cache hits
    finally:
        hook.remove()
    assert [len(g) for g in got] == [len(w) for w in whole]
    for g, w in zip(got, whole):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4)
    assert tokens < 0.7 * n_whole  # the negatives' shared prefixes ran once, as their experts'


def test_without_experts_every_chain_runs_whole(setup):
    demos, model, tok = setup
    chains = [(d.prompt, d.steps) for d in demos[:3]]
    assert family_step_logprobs(model, tok, chains, 256, "\n", {}) == step_logprobs(model, tok, chains, 256, "\n")
