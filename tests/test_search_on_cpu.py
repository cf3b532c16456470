"""Reward-guided search: the step continuation layout, partial-chain scores, Best-of-N and beam search, the
`dense-irl search` command and its errors (tiny random models, real HFEngine, no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from dense_irl.algo.batches import Rollout
from dense_irl.cli import main
from dense_irl.data.layout import encode_chains, prefix_ids
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.errors import ConfigError
from dense_irl.models.factory import ModelConfig, build_tiny, save_policy
from dense_irl.models.reward_model import RewardModel, RewardModelConfig
from dense_irl.sampling.engines import HFEngine, RolloutConfig
from dense_irl.search.config import SearchConfig, SearchJobConfig
from dense_irl.search.run import run_search
from dense_irl.search.step_search import best_of_n, reward_model_scorer, search, step_beam_search


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random policy (saved) and a reward model on it with random heads, the logit readout."""
    demos = generate(SyntheticConfig(n_problems=60, seed=5))
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=160)
    model, tok = build_tiny(cfg, [d.prompt for d in demos] + [s for d in demos for s in d.steps])
    root = tmp_path_factory.mktemp("search")
    save_policy(model, tok, root / "policy")
    rm = RewardModel(model, tok, RewardModelConfig(max_length=160, readout="logit"))
    torch.manual_seed(0)
    for head in (rm.g_head, rm.h_head):
        torch.nn.init.normal_(head.weight, std=0.5)
    rm.save_pretrained(root / "rm")
    return {"demos": demos, "rm": rm, "tok": tok, "root": root, "engine": HFEngine(str(root / "policy"))}


def test_prefix_ids_continue_exactly_where_the_layout_puts_the_next_step(tiny):
    tok, d = tiny["tok"], tiny["demos"][0]
    full = encode_chains(tok, [(d.prompt, d.steps)], 512)
    ids = full.input_ids[0, : int(full.attention_mask[0].sum())].tolist()
    for k in range(len(d.steps)):
        head = prefix_ids(tok, d.prompt, d.steps[:k], "\n")
        assert ids[: len(head)] == head
        assert int(full.step_start[0, k]) == len(head)  # step k starts right after its prefix


def test_partial_chains_end_with_the_separator_and_score_as_the_full_chains_leading_steps(tiny):
    rm, d = tiny["rm"], tiny["demos"][1]
    enc = encode_chains(rm.tokenizer, [(d.prompt, d.steps[:2])], 512, finished=[False])
    n = int(enc.attention_mask[0].sum())
    assert enc.input_ids[0, n - 1] != rm.tokenizer.eos_token_id and enc.partial == [True]
    full = rm.score([(d.prompt, d.steps)])[0].step_rewards
    partial = rm.score([(d.prompt, d.steps[:2])], finished=[False])[0].step_rewards
    closed = rm.score([(d.prompt, d.steps[:2])])[0].step_rewards
    assert partial == pytest.approx(full[:2], abs=1e-4)  # causal backbone: same tokens, same scores
    assert closed[1] != pytest.approx(full[1], abs=1e-4)  # closed by </s>, the last step reads differently
    with pytest.raises(ValueError, match="finished flags"):
        encode_chains(rm.tokenizer, [(d.prompt, d.steps)], 512, finished=[True, False])


def test_hf_next_steps_sample_one_step_from_the_prefix(tiny):
    eng, d = tiny["engine"], tiny["demos"][2]
    cfg = RolloutConfig(temperature=1.0, max_new_tokens=24)
    groups = eng.next_steps([(d.prompt, d.steps[:1]), (d.prompt, [])], 3, cfg, "\n", seed=1)
    assert [len(g) for g in groups] == [3, 3]
    for g, steps in zip(groups, (d.steps[:1], [])):
        for r in g:
            assert r.prompt_ids == prefix_ids(eng.tokenizer, d.prompt, steps, "\n")
            assert len(r.steps) <= 1 and len(r.token_ids) <= 24
            text = eng.tokenizer.decode(r.token_ids, skip_special_tokens=True)
            assert text.count("\n") <= 1 and (not text.count("\n") or text.rstrip(" ").endswith("\n"))
            assert len(r.logprobs) == len(r.token_ids)


class ScriptedSampler:
    """Proposes next steps from a fixed table keyed by the steps so far (the algorithm's test double)."""

    def __init__(self, table, chains):
        self.table, self.chains, self.calls = table, chains, []

    def next_steps(self, chains, n, cfg, separator, seed=None):
        self.calls.append([tuple(s) for _, s in chains])
        out = []
        for prompt, steps in chains:
            opts = self.table[tuple(steps)]
            out.append([Rollout(prompt, o[0], [o[0]] if o[0] else [], [1] * 5, [0.0] * 5, o[1])
                        for o in (opts * n)[:n]])
        return out

    def generate(self, prompts, n, cfg, separator, seed=None):
        return [[Rollout(p, separator.join(s), list(s), [1] * 10, [0.0] * 10, True) for s in self.chains[:n]]
                for p in prompts]


def rule_scorer(chains, finished):
    """A step scores -1 when it says 'bad', else +1 (+0.5 more for a finished chain's last step)."""
    return [[-1.0 if "bad" in s else 1.0 + (0.5 if f and k == len(steps) - 1 else 0.0)
             for k, s in enumerate(steps)] for (_, steps), f in zip(chains, finished)]


def test_beam_search_keeps_the_best_partial_chains_and_counts_every_token():
    table = {(): [("good a", False), ("bad a", False)],
             ("good a",): [("good b", False), ("bad b", False)],
             ("bad a",): [("good c", False), ("good c2", False)],
             ("good a", "good b"): [("The answer is 3.", True), ("bad end", True)],
             ("good a", "bad b"): [("The answer is 4.", True), ("The answer is 4.", True)]}
    sampler = ScriptedSampler(table, [])
    cfg = SearchConfig(method="beam", beam_width=2, expand=2, max_steps=5, aggregation="min")
    (res,) = step_beam_search(sampler, rule_scorer, ["q"], cfg, "\n")
    assert res.best.steps == ["good a", "good b", "The answer is 3."] and res.best.finished
    assert res.best.answer == "3"
    # depth 0 expands the prompt; depth 1 both kept chains; depth 2 the two best (the 'bad a' branch dropped);
    # depth 3 nothing: every kept chain has finished
    assert sampler.calls == [[()], [("good a",), ("bad a",)], [("good a", "good b"), ("good a", "bad b")]]
    assert res.tokens_generated == 5 * (2 + 4 + 4)
    assert len(res.candidates) == 2 and all(c.finished for c in res.candidates)


def test_a_finished_chain_that_scores_worse_does_not_end_the_beam_search():
    table = {(): [("bad end", True), ("good a", False)], ("good a",): [("The answer is 3.", True)] * 2}
    sampler = ScriptedSampler(table, [])
    cfg = SearchConfig(method="beam", beam_width=1, expand=2, max_steps=4)
    (res,) = step_beam_search(sampler, rule_scorer, ["q"], cfg, "\n")
    assert res.best.steps == ["good a", "The answer is 3."] and len(sampler.calls) == 2


def test_best_of_n_prefers_finished_chains_and_majority_counts_answers():
    chains = [["bad x", "The answer is 1."], ["ok", "The answer is 2."], ["ok", "The answer is 1."],
              ["ok", "The answer is 1."]]
    sampler = ScriptedSampler({}, chains)
    (res,) = best_of_n(sampler, rule_scorer, ["q"], SearchConfig(n=4, aggregation="min"), "\n")
    assert res.best.steps == chains[1] and res.tokens_generated == 40
    assert res.majority().answer == "1"
    (res,) = best_of_n(sampler, rule_scorer, ["q"], SearchConfig(n=4, aggregation="sum"), "\n")
    assert res.best.score == pytest.approx(2.5)


def test_search_with_the_real_engine_and_reward_model(tiny):
    eng, rm = tiny["engine"], tiny["rm"]
    prompts = [d.prompt for d in tiny["demos"][:2]]
    scorer = reward_model_scorer(rm)
    for cfg in (SearchConfig(method="beam", beam_width=2, expand=2, max_steps=3, max_step_tokens=12),
                SearchConfig(method="best_of_n", n=3, max_new_tokens=30),
                SearchConfig(method="greedy", max_new_tokens=30)):
        results = search(eng, scorer, prompts, cfg, "\n")
        assert len(results) == 2
        for r in results:
            assert r.tokens_generated > 0 and r.best in r.candidates
            scored = [c for c in r.candidates if c.steps]
            assert all(len(c.step_scores) == len(c.steps) for c in scored)
            assert r.best.score == max(c.score for c in r.candidates if c.finished == r.best.finished)


def test_search_config_errors_name_the_option():
    for bad, match in ((dict(method="mcts"), "search.method"), (dict(aggregation="max"), "search.aggregation"),
                       (dict(n=0), "search.n"), (dict(temperature=0.0), "search.temperature"),
                       (dict(seed=-1), "search.seed"), (dict(seed=2**64), "search.seed")):
        with pytest.raises(ConfigError, match=match):
            SearchConfig(**bad).check()
    with pytest.raises(ConfigError, match="policy is required"):
        SearchJobConfig(reward_model="x", data="y").check()


def test_search_command_writes_rows_and_a_summary_with_majority_and_oracle(tiny, tmp_path, capsys):
    from dense_irl.io import write_jsonl

    demos = tiny["demos"][:3]
    write_jsonl(tmp_path / "prompts.jsonl", [{**d.to_row(), "meta": d.meta} for d in demos])
    out = tmp_path / "res.jsonl"
    code = main(["search", "--policy", str(tiny["root"] / "policy"), "--reward-model", str(tiny["root"] / "rm"),
                 "--data", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--search.n=2",
                 "--search.max_new_tokens=24"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(printed)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and summary["prompts"] == 3 and summary["with_answers"] == 3
    assert {"accuracy", "majority_accuracy", "oracle_accuracy"} <= set(summary)
    assert json.loads((tmp_path / "res.jsonl.summary.json").read_text())["method"] == "best_of_n"
    assert all(len(r["candidates"]) == 2 and isinstance(r["correct"], bool) for r in rows)
    # bare prompts (no steps) are searched too; a bad key is an error naming it
    write_jsonl(tmp_path / "bare.jsonl", [{"prompt": demos[0].prompt}])
    cfg = SearchJobConfig(policy=str(tiny["root"] / "policy"), reward_model=str(tiny["root"] / "rm"),
                          data=str(tmp_path / "bare.jsonl"), out=str(tmp_path / "bare_out.jsonl"),
                          search=SearchConfig(method="greedy", max_new_tokens=16))
    assert "accuracy" not in run_search(cfg, engine=tiny["engine"], progress=False)
    code = main(["search", "--policy", "p", "--reward-model", "r", "--data", "d", "--search.beam=3"])
    assert code == 2 and "beam" in capsys.readouterr().err
