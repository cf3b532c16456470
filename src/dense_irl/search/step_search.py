"""Reward-guided search at test time: Best-of-N reranking and step-level beam search by step rewards.

Both run over a *sampler* (a rollout engine: ``sampling.engines.HFEngine`` or ``VLLMEngine``, which sample
whole chains with ``generate`` and one next step of partial chains with ``next_steps``) and a *scorer*
(``scorer(chains, finished) -> step scores per chain``: the reward model's served step scores, one forward
pass per chain). A chain's score is its step scores aggregated (min, last, sum or mean, as Best-of-N
evaluation aggregates them); a finished chain (it ended with ``</s>``) ranks above every unfinished one.

Beam search, per prompt: start from the bare prompt; at each step sample ``expand`` next steps of each of
the ``beam_width`` kept partial chains, score every new partial chain (its last step closed by the
separator, not ``</s>``: ``data.layout.encode_chains(finished=...)``), and keep the ``beam_width`` best
scored of the new ones and the finished ones kept before. It stops when every kept chain is finished or
after ``max_steps`` steps; the answer is the best finished chain kept (an unfinished one if none finished). Every generated token is counted (``tokens_generated``), so methods are compared at
equal cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dense_irl.data.answers import final_answer
from dense_irl.data.layout import Chain
from dense_irl.eval.bon import aggregate
from dense_irl.sampling.engines import RolloutConfig
from dense_irl.search.config import SearchConfig

Scorer = Callable[[list[Chain], list[bool]], list[list[float]]]


class Sampler(Protocol):
    """What a search samples from (both rollout engines are one)."""

    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig, separator: str, seed: int | None = None): ...

    def next_steps(self, chains: list[Chain], n: int, cfg: RolloutConfig, separator: str,
                   seed: int | None = None): ...


@dataclass
class Candidate:
    """One chain a search produced, with its step scores and its score under the search's aggregation."""

    steps: list[str]
    step_scores: list[float]
    score: float
    finished: bool
    answer: str | None  # the last final answer it states ("The answer is N"), normalised; None when none

    def completion(self, separator: str) -> str:
        return separator.join(self.steps)


@dataclass
class SearchResult:
    """A prompt's search: the chosen chain, every chain it ranked last, and the tokens it generated."""

    prompt: str
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    tokens_generated: int = 0

    def majority(self) -> Candidate | None:
        """The candidate majority vote over the candidates' answers picks (ties: the first answer to reach the
        top count; the first candidate with it), None when no candidate states an answer. The baseline a
        reward-guided pick is measured against, on the same samples."""
        counts = Counter(c.answer for c in self.candidates if c.answer is not None)
        if not counts:
            return None
        top = max(counts.values())
        winner = next(c.answer for c in self.candidates if c.answer is not None and counts[c.answer] == top)
        return next(c for c in self.candidates if c.answer == winner)


def rollout_config(cfg: SearchConfig, batch_size: int, one_step: bool) -> RolloutConfig:
    """The sampling settings a search gives its engine."""
    greedy = cfg.method == "greedy"
    return RolloutConfig(temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, batch_size=batch_size,
                         max_new_tokens=cfg.max_step_tokens if one_step else cfg.max_new_tokens)


def _rank_key(c: Candidate) -> tuple[bool, float]:
    return (c.finished, c.score)


def _candidates(chains: list[Chain], finished: list[bool], scorer: Scorer, agg: str) -> list[Candidate]:
    """Score ``chains`` (a chain with no step is not scored: it ranks below every scored one)."""
    keep = [j for j, (_, steps) in enumerate(chains) if steps]
    scores: list[list[float]] = [[] for _ in chains]
    if keep:
        for j, s in zip(keep, scorer([chains[j] for j in keep], [finished[j] for j in keep])):
            scores[j] = s
    return [Candidate(steps=list(steps), step_scores=s, score=float(aggregate(agg, s)), finished=f,
                      answer=final_answer(" ".join(steps)))
            for (_, steps), s, f in zip(chains, scores, finished)]


def best_of_n(sampler: Sampler, scorer: Scorer, prompts: list[str], cfg: SearchConfig, separator: str,
              batch_size: int = 32) -> list[SearchResult]:
    """Sample ``cfg.n`` chains per prompt (one when greedy), keep the best by aggregated step score."""
    n = 1 if cfg.method == "greedy" else cfg.n
    groups = sampler.generate(prompts, n, rollout_config(cfg, batch_size, one_step=False), separator, cfg.seed)
    flat = [(p, r) for p, group in zip(prompts, groups) for r in group]
    cands = _candidates([(p, r.steps) for p, r in flat], [r.finished for _, r in flat], scorer, cfg.aggregation)
    out, k = [], 0
    for p, group in zip(prompts, groups):
        mine = cands[k : k + len(group)]
        k += len(group)
        out.append(SearchResult(p, max(mine, key=_rank_key), mine, sum(len(r.token_ids) for r in group)))
    return out


def step_beam_search(sampler: Sampler, scorer: Scorer, prompts: list[str], cfg: SearchConfig, separator: str,
                     batch_size: int = 32) -> list[SearchResult]:
    """Step-level beam search (see the module docstring) for every prompt at once."""
    rcfg = rollout_config(cfg, batch_size, one_step=True)
    beams: list[list[Candidate]] = [[Candidate([], [], 0.0, False, None)] for _ in prompts]
    tokens = [0] * len(prompts)
    for depth in range(cfg.max_steps):
        open_ = [(i, b) for i, bs in enumerate(beams) for b in bs if not b.finished]
        if not open_:
            break
        samples = sampler.next_steps([(prompts[i], b.steps) for i, b in open_], cfg.expand, rcfg, separator,
                                     cfg.seed + depth)
        children: list[tuple[int, list[str], bool]] = []
        seen: set[tuple[int, tuple[str, ...], bool]] = set()
        for (i, b), group in zip(open_, samples):
            for r in group:
                tokens[i] += len(r.token_ids)
                if not r.steps and not (r.finished and b.steps):
                    continue  # an empty step that does not end a chain: nothing to keep
                steps = b.steps + r.steps[:1]
                key = (i, tuple(steps), r.finished)
                if key not in seen:  # identical samples would take several beam slots
                    seen.add(key)
                    children.append((i, steps, r.finished))
        scored = _candidates([(prompts[i], s) for i, s, _ in children], [f for _, _, f in children], scorer,
                             cfg.aggregation)
        pools: list[list[Candidate]] = [[b for b in bs if b.finished] for bs in beams]
        for (i, _, _), c in zip(children, scored):
            pools[i].append(c)
        # Within the search open and finished chains compete on their score alone (a finished chain that scores
        # worse than an open one must not end the search); the final pick prefers finished ones. A prompt whose
        # samples were all empty keeps its beams rather than losing them.
        beams = [sorted(pool, key=lambda c: c.score, reverse=True)[: cfg.beam_width] if pool else bs
                 for pool, bs in zip(pools, beams)]
    return [SearchResult(p, max(bs, key=_rank_key), bs, t) for p, bs, t in zip(prompts, beams, tokens)]


def search(sampler: Sampler, scorer: Scorer, prompts: list[str], cfg: SearchConfig, separator: str,
           batch_size: int = 32) -> list[SearchResult]:
    """Run ``cfg.method`` (best_of_n, beam or greedy) on ``prompts``."""
    cfg.check()
    fn = step_beam_search if cfg.method == "beam" else best_of_n
    return fn(sampler, scorer, prompts, cfg, separator, batch_size)


def reward_model_scorer(rm, batch_size: int = 32) -> Scorer:
    """A scorer from a ``RewardModel``: the step scores it serves (its readout), partial chains scored as such."""

    def score(chains: list[Chain], finished: list[bool]) -> list[list[float]]:
        return [s.step_rewards for s in rm.score(chains, batch_size=batch_size, finished=finished)]

    return score
