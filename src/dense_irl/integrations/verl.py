"""verl reward managers: dense-irl's step rewards as verl's rewards, on both of verl's reward paths.

**verl 0.7+ reward loop** (``verl.experimental.reward_loop``, the default of verl 0.9's ``main_ppo``): its
workers call ``DenseIRLRewardLoopManager.run_single`` on each rollout as soon as it is sampled. Name it by
module, so verl's reward workers import it themselves::

    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://dense_irl.integrations.verl
    reward.reward_manager.name=DenseIRLRewardLoopManager
    +reward.reward_kwargs.url=http://127.0.0.1:8000       a running `dense-irl serve` (/v1/score)
    +reward.reward_kwargs.reward_model=/path/to/rm         or the checkpoint, scored in the reward worker
    +reward.reward_kwargs.aggregate=sum                    the rollout's score: sum (default), min or last

That loop keeps one score per response (verl puts it on the last response token), so this manager answers
the chain's return, the sum of its step rewards, and reports the worst step, the first error and the steps
scored in ``reward_extra_info``. GRPO, RLOO and the other outcome estimators sum the token rewards anyway, so
for them the sum is exactly the dense reward.

**verl's legacy reward-manager path** (``verl.workers.reward_manager``, called with the whole batch):
``DenseIRLRewardManager`` returns the ``(batch, response_length)`` token-level scores, each step's reward on
the step's last response token (``place: last``) or spread over the step (``place: spread``)::

    reward_model.reward_manager=dense_irl                  (after `import dense_irl.integrations.verl`)
    +reward_model.reward_kwargs.url=...  |  +reward_model.reward_kwargs.reward_model=...
    +reward_model.reward_kwargs.place=last
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.workers.reward_manager import register
from verl.workers.reward_manager.abstract import AbstractRewardManager

from dense_irl.integrations.token_rewards import PLACES, dense_rewards, prompt_text, step_end_tokens
from dense_irl.models.reward_model import ChainScore
from dense_irl.serving.schemas import aggregate

Chain = tuple[str, list[str]]
AGGREGATES = ("sum", "min", "last")


def chain_scorer(who: str, url: str | None = None, reward_model: str | None = None, token: str | None = None,
                 separator: str | None = None, batch_size: int = 32, timeout: float = 180.0, device: str = "cpu"
                 ) -> tuple[str, Callable[[list[Chain]], list[ChainScore]]]:
    """``(separator, score)``: chains scored by a running server (``url``) or a checkpoint in this process."""
    if (url is None) == (reward_model is None):
        raise ValueError(f"{who}: give exactly one of reward_kwargs.url (a running dense-irl serve) or "
                         "reward_kwargs.reward_model (a checkpoint folder, scored in-process)")
    if reward_model is not None:
        from dense_irl.models.reward_model import RewardModel

        rm = RewardModel.from_pretrained(reward_model, device=device)
        return separator or rm.config.separator, lambda chains: rm.score(chains, batch_size)
    from dense_irl.serving.client import score_chains, server_info

    token = token or os.environ.get("DENSE_IRL_TOKEN")

    def score(chains: list[Chain]) -> list[ChainScore]:
        return [ChainScore(r["step_rewards"], r["paragraph_rewards"], r["task_reward"], r["first_error"],
                           r["steps_scored"]) for r in score_chains(chains, url, token, batch_size, timeout)]

    return separator or server_info(url, token)["data"][0]["separator"], score  # the live checkpoint's


@register("dense_irl")
class DenseIRLRewardManager(AbstractRewardManager):
    """Dense token-level step rewards for verl's legacy reward-manager path (see the module docstring)."""

    def __init__(self, tokenizer: Any, num_examine: int = 0, compute_score=None, reward_fn_key: str = "data_source",
                 url: str | None = None, reward_model: str | None = None, token: str | None = None,
                 place: str = "last", separator: str | None = None, batch_size: int = 32, timeout: float = 180.0,
                 device: str = "cpu", **kwargs: Any):
        if place not in PLACES:
            raise ValueError(f"DenseIRLRewardManager: place must be one of {list(PLACES)}, got {place!r}")
        self.tokenizer, self.num_examine, self.place = tokenizer, num_examine, place
        self.separator, score = chain_scorer("DenseIRLRewardManager", url, reward_model, token, separator,
                                             batch_size, timeout, device)
        self.score = lambda chains: [s.step_rewards for s in score(chains)]

    def __call__(self, data: DataProto, return_dict: bool = False):
        prompts_t, responses_t = data.batch["prompts"], data.batch["responses"]
        mask = data.batch["attention_mask"]
        P, R = prompts_t.shape[-1], responses_t.shape[-1]
        prompts, responses = [], []
        for i in range(len(data)):
            n_prompt, n_resp = int(mask[i, :P].sum()), int(mask[i, P:].sum())
            prompts.append(prompts_t[i, P - n_prompt :].tolist())  # prompts are left-padded
            responses.append(responses_t[i, :n_resp].tolist())  # responses right-padded
        rewards, chains, step_rewards = dense_rewards(self.tokenizer, prompts, responses, R, self.score,
                                                      self.separator, self.place)
        for i in range(min(self.num_examine, len(chains))):
            print(f"[dense_irl] prompt: {chains[i][0]!r}\n[dense_irl] steps: {chains[i][1]}\n"
                  f"[dense_irl] step rewards: {step_rewards[i]}")
        if not return_dict:
            return rewards
        extra = {"dense_irl_task_reward": [float(sum(s)) for s in step_rewards],
                 "dense_irl_steps_scored": [len(s) for s in step_rewards],
                 "dense_irl_steps": [len(c[1]) for c in chains]}
        return {"reward_tensor": rewards, "reward_extra_info": extra}


class DenseIRLRewardLoopManager(RewardManagerBase):
    """One dense-irl score per rollout for verl's asynchronous reward loop (see the module docstring)."""

    KWARGS = ("url", "reward_model", "token", "separator", "batch_size", "timeout", "device", "aggregate")

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **_: Any):
        super().__init__(config, tokenizer, compute_score)
        kwargs = dict(config.reward.get("reward_kwargs") or {})
        unknown = sorted(set(kwargs) - set(self.KWARGS))
        if unknown:  # a key this manager would ignore is a mistake in the user's config
            raise ValueError(f"DenseIRLRewardLoopManager: unknown reward.reward_kwargs {unknown}; "
                             f"it takes {list(self.KWARGS)}")
        self.how = kwargs.pop("aggregate", "sum")
        if self.how not in AGGREGATES:
            raise ValueError(f"DenseIRLRewardLoopManager: reward_kwargs.aggregate must be one of "
                             f"{list(AGGREGATES)}, got {self.how!r}")
        self.separator, self.score = chain_scorer("DenseIRLRewardLoopManager", **kwargs)

    def chain(self, data: DataProto) -> Chain:
        """The ``(problem, steps)`` of a one-rollout batch (its prompt left- or right-padded, as verl sends)."""
        item = data[-1]  # a multi-output rollout is scored on its last sequence, as verl's own managers do
        P = item.batch["prompts"].shape[-1]
        mask = item.batch["attention_mask"].bool()
        prompt = item.batch["prompts"][mask[:P]].tolist()
        response = item.batch["responses"][: int(mask[P:].sum())].tolist()
        steps, _ = step_end_tokens(self.tokenizer, response, self.separator)
        return prompt_text(self.tokenizer, prompt), steps or [""]

    async def run_single(self, data: DataProto) -> dict:
        def chain_and_score(data):
            chain = self.chain(data)
            return chain, self.score([chain])[0]

        # The worker's loop: decoding and scoring block, so they run off it (one hop).
        chain, s = await asyncio.get_running_loop().run_in_executor(None, chain_and_score, data)
        return {"reward_score": aggregate(s.step_rewards, self.how),
                "reward_extra_info": {"dense_irl_task_reward": s.task_reward,
                                      "dense_irl_min_step_reward": min(s.step_rewards, default=0.0),
                                      "dense_irl_first_error": s.first_error,
                                      "dense_irl_steps_scored": s.steps_scored,
                                      "dense_irl_steps": len(chain[1])}}
