"""verl reward manager: dense-irl's step rewards as verl's token-level scores.

``DenseIRLRewardManager`` implements verl's ``AbstractRewardManager`` and is registered as ``dense_irl`` in
``verl.workers.reward_manager``. ``__call__(data: DataProto)`` decodes each rollout's valid prompt and
response tokens, scores the response's steps, and returns the ``(batch, response_length)`` float32
token-level scores (with ``return_dict``, also ``reward_extra_info``: task reward, steps scored and steps
given per rollout). Trainers that take their reward function from that registry name it with

    reward_model.reward_manager=dense_irl                       (after `import dense_irl.integrations.verl`)
    +reward_model.reward_kwargs.url=http://127.0.0.1:8000        a running `dense-irl serve` (/v1/score)
    +reward_model.reward_kwargs.reward_model=/path/to/rm         or the checkpoint, scored in-process
    +reward_model.reward_kwargs.place=last                       each step's reward on its last token, or spread

verl 0.9's default trainer scores rollouts in its asynchronous reward loop (``verl.experimental.reward_loop``),
which keeps one score per response and does not call this interface.
"""

from __future__ import annotations

import os
from typing import Any

from verl import DataProto
from verl.workers.reward_manager import register
from verl.workers.reward_manager.abstract import AbstractRewardManager

from dense_irl.integrations.token_rewards import PLACES, dense_rewards


@register("dense_irl")
class DenseIRLRewardManager(AbstractRewardManager):
    """Dense step rewards from a dense-irl reward model, for verl (see the module docstring)."""

    def __init__(self, tokenizer: Any, num_examine: int = 0, compute_score=None, reward_fn_key: str = "data_source",
                 url: str | None = None, reward_model: str | None = None, token: str | None = None,
                 place: str = "last", separator: str | None = None, batch_size: int = 32, timeout: float = 180.0,
                 device: str = "cpu", **kwargs: Any):
        if (url is None) == (reward_model is None):
            raise ValueError("DenseIRLRewardManager: give exactly one of reward_kwargs.url (a running dense-irl "
                             "serve) or reward_kwargs.reward_model (a checkpoint folder, scored in-process)")
        if place not in PLACES:
            raise ValueError(f"DenseIRLRewardManager: place must be one of {list(PLACES)}, got {place!r}")
        self.tokenizer, self.num_examine, self.place = tokenizer, num_examine, place
        if reward_model is not None:
            from dense_irl.models.reward_model import RewardModel

            rm = RewardModel.from_pretrained(reward_model, device=device)
            self.separator = separator or rm.config.separator
            self.score = lambda chains: [s.step_rewards for s in rm.score(chains, batch_size)]
        else:
            from dense_irl.serving.client import score_chains, server_info

            token = token or os.environ.get("DENSE_IRL_TOKEN")
            self.separator = separator or server_info(url, token)["data"][0]["separator"]  # the live checkpoint's
            self.score = lambda chains: [r["step_rewards"] for r in score_chains(chains, url, token, batch_size,
                                                                                   timeout)]

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
