"""OpenRLHF's Python-function reward path: dense-irl step rewards without writing any code.

    python -m dense_irl.integrations.openrlhf_reward        # prints this file's path
    openrlhf.cli.train_ppo_ray ... --reward.remote_url <that path>    (OpenRLHF <= 0.10: --remote_rm_url)

OpenRLHF loads the file and calls ``reward_func(queries, prompts, labels)`` (``utils/agent.py``) with each
rollout's decoded prompt + response. The chains are scored in one of two ways:

- ``DENSE_IRL_URL`` (default ``http://127.0.0.1:8000``): a running ``dense-irl serve``, through its
  ``/get_reward`` (the bearer token from ``DENSE_IRL_TOKEN``);
- ``DENSE_IRL_REWARD_MODEL=PATH``: the checkpoint loaded in the calling process, once, on CPU (or CUDA with
  ``DENSE_IRL_DEVICE=cuda``), with the same request parsing as the server.

Either way the answer is the server's: ``rewards`` (the step rewards' aggregate, ``DENSE_IRL_AGGREGATE``
sum / min / last), ``scores`` and ``extra_logs`` (task reward, worst step, first error, steps scored; with
``DENSE_IRL_LOG_STEPS=N`` in-process, or ``dense-irl serve --log-steps N``, the first N step rewards too).
"""

from __future__ import annotations

import os
import threading

_LOCAL: dict = {}
# OpenRLHF calls reward_func from several threads at once (asyncio.to_thread per query): load the checkpoint
# once, under a lock (transformers' loading is not thread-safe), and score one batch at a time.
_LOCK = threading.Lock()


def _local(path: str):
    with _LOCK:
        if path not in _LOCAL:
            from dense_irl.models.reward_model import RewardModel

            _LOCAL[path] = RewardModel.from_pretrained(path, device=os.environ.get("DENSE_IRL_DEVICE", "cpu"))
    return _LOCAL[path]


def _in_process(path: str, body: dict, how: str) -> dict:
    from dense_irl.serving.requests import query_chains
    from dense_irl.serving.schemas import GetRewardRequest, get_reward_answer

    rm = _local(path)
    chains = query_chains(GetRewardRequest(**body), rm.tokenizer, rm.config.separator)
    with _LOCK:
        scored = rm.score(chains)
    return get_reward_answer(scored, how, int(os.environ.get("DENSE_IRL_LOG_STEPS", "0")))


def reward_func(queries, prompts, labels) -> dict:
    """OpenRLHF's reward function: ``{"rewards", "scores", "extra_logs"}`` for the given rollouts."""
    body = {"query": list(queries), "prompts": list(prompts), "labels": list(labels)}
    how = os.environ.get("DENSE_IRL_AGGREGATE", "sum")
    path = os.environ.get("DENSE_IRL_REWARD_MODEL")
    if path:
        return _in_process(path, body, how)
    import httpx

    url = os.environ.get("DENSE_IRL_URL", "http://127.0.0.1:8000").rstrip("/") + "/get_reward"
    token = os.environ.get("DENSE_IRL_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.post(url, json=body, headers=headers, timeout=float(os.environ.get("DENSE_IRL_TIMEOUT", "180")))
    r.raise_for_status()
    return r.json()


if __name__ == "__main__":
    print(os.path.abspath(__file__))
