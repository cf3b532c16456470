"""The demonstrations' split and order, the negatives and the typed batches of ``dense_irl.algo`` (no Ray)."""

from __future__ import annotations

import random

import pytest
import torch

from dense_irl.algo.batches import Experience, Negative, RewardBatch, Rollout
from dense_irl.algo.experience import (
    next_prompts,
    online_reward_batch,
    perturbed_negatives,
    policy_negatives,
    shared_prefix,
    split_demos,
)
from dense_irl.data.layout import prompt_ids
from dense_irl.data.perturb import KINDS
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.factory import train_tokenizer


@pytest.fixture(scope="module")
def demos():
    return generate(SyntheticConfig(n_problems=50, seed=3))


def test_split_demos_is_seeded_and_holds_out_at_most_a_fifth(demos):
    calib, train = split_demos(demos, 400, seed=1)
    assert len(calib) == 10 and len(train) == 40  # at most a fifth of 50
    assert {d.id for d in calib}.isdisjoint(d.id for d in train)
    again = split_demos(demos, 400, seed=1)
    assert [d.id for d in again[0]] == [d.id for d in calib]
    assert [d.id for d in split_demos(demos, 400, seed=2)[0]] != [d.id for d in calib]
    assert len(split_demos(demos, 3, seed=1)[0]) == 3


def test_next_prompts_is_deterministic_and_walks_epochs():
    items = list(range(10))
    a, cur = next_prompts(items, {"epoch": 0, "pos": 0}, 4, seed=3)
    b, cur = next_prompts(items, cur, 4, seed=3)
    c, cur = next_prompts(items, cur, 4, seed=3)
    assert sorted(a + b + c[:2]) == items  # one epoch covers every prompt once
    assert cur == {"epoch": 1, "pos": 2}
    assert next_prompts(items, {"epoch": 0, "pos": 4}, 4, seed=3)[0] == b


def test_negatives_know_where_they_leave_the_expert(demos):
    assert shared_prefix(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert shared_prefix(["a", "b"], ["a", "b", "c"]) == 2
    assert shared_prefix([], ["a"]) == 0
    negs = perturbed_negatives(demos[:20], list(KINDS), random.Random(3))
    assert len(negs) == 20
    for demo, neg in zip(demos[:20], negs):
        assert neg.prompt == demo.prompt and neg.steps[: neg.shared] == demo.steps[: neg.shared]
        assert neg.steps != demo.steps
    # the same rng state gives the same negatives
    assert perturbed_negatives(demos[:5], list(KINDS), random.Random(3)) == negs[:5]
    only = perturbed_negatives(demos[:5], ["wrong_final_answer"], random.Random(0))
    assert all(n.shared == len(d.steps) - 1 for n, d in zip(only, demos))  # only the last step changed


def _rollout(demo, steps):
    return Rollout(prompt=demo.prompt, completion="\n".join(steps), steps=steps, token_ids=[1], logprobs=[-1.0],
                   finished=True)


def test_policy_negatives_and_the_online_mix(demos):
    d = demos[0]
    samples = [(d, _rollout(d, d.steps[:1] + ["I guess 7."])), (d, _rollout(d, ["nonsense"]))]
    assert policy_negatives(samples) == [Negative(d.prompt, d.steps[:1] + ["I guess 7."], 1),
                                         Negative(d.prompt, ["nonsense"], 0)]
    rb = online_reward_batch(demos, samples * 10, batch_size=8, negative_mix=0.25, kinds=list(KINDS),
                             rng=random.Random(0))
    assert len(rb.experts) == 8 and len(rb.negatives) == 8
    assert sum(n.steps in (s.steps for _, s in samples) for n in rb.negatives) == 6  # 3/4 policy samples
    # no policy samples: only the perturbed share is filled
    rb = online_reward_batch(demos, [], batch_size=8, negative_mix=0.25, kinds=list(KINDS), rng=random.Random(0))
    assert len(rb.negatives) == 2


def test_reward_batch_chains_and_shards():
    rb = RewardBatch([("p1", ["a"]), ("p2", ["b"]), ("p3", ["c"])], [Negative("p1", ["x"], 0), Negative("p2", ["y"])])
    assert rb.chains() == [("p1", ["a"]), ("p2", ["b"]), ("p3", ["c"]), ("p1", ["x"]), ("p2", ["y"])]
    a, b = rb.shard(2)
    assert a.experts == [("p1", ["a"]), ("p3", ["c"])] and [n.steps for n in a.negatives] == [["x"]]
    assert b.experts == [("p2", ["b"])] and [n.steps for n in b.negatives] == [["y"]]


def test_experience_tensors_give_each_token_its_steps_advantage():
    tok = train_tokenizer(["Tom has 3 apples.", "3 + 4 = 7", "The answer is 7."], 300)
    text = "3 + 4 = 7\nThe answer is 7."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    r = Rollout("Tom has 3 apples.", text, text.split("\n"), ids, [-0.5] * len(ids), True)
    exp = Experience([r, r], [[1.0, -2.0], [3.0]], [("Tom has 3 apples.", text.split("\n"))])
    t = exp.tensors(tok, "\n", "cpu")
    head = prompt_ids(tok, r.prompt, "\n")
    n = len(head)
    assert t["input_ids"][0].tolist() == head + ids and t["mask"][0, :n].sum() == 0 and t["mask"][0, n:].all()
    first_step = len(tok("3 + 4 = 7", add_special_tokens=False)["input_ids"])
    adv = t["advantages"][0, n:].tolist()
    assert set(adv[: first_step + 1]) == {1.0} and set(adv[first_step + 1 :]) == {-2.0}  # "\n" closes step 0
    assert set(t["advantages"][1, n:].tolist()) == {3.0}  # fewer advantages than steps: the last one repeats
    assert torch.equal(t["old_logp"][0, n:], torch.full((len(ids),), -0.5))
    s0, s1 = exp.shard(2)
    assert s0.advantages == [[1.0, -2.0]] and s1.advantages == [[3.0]] and s0.experts and not s1.experts
    with pytest.raises(ValueError, match="advantage lists"):
        Experience([r], [])
