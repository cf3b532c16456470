"""The online run's warm start: a policy of ``cfg.model`` trained by SFT on the demonstrations (on one learner of
the learners' kind: backend, GPU share), and the reward model initialised from it (or from ``reward_backbone``)."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import ray
from tqdm import tqdm

from dense_irl.irl.offline_config import reward_model_config
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.runtime.learners import PolicyLearner, free_port


def warm_start(drv) -> tuple[Path, Path]:
    """SFT for ``sft.max_steps`` steps (at most ``sft.minutes``); returns the SFT policy's and the initial reward
    model's folders under ``output_dir/init/``. The steps taken go to ``drv.state["sft_steps"]``."""
    cfg = drv.cfg
    # The tiny tokenizer is built from the training texts, in the driver's process; training runs on a learner.
    texts = [d.prompt for d in drv.train] + [s for d in drv.train for s in d.steps]
    model, tok = load_policy(cfg.model, texts, cfg.seed)
    init = drv.out / "init"
    save_policy(model, tok, init / "policy")
    if cfg.reward_backbone:  # checked before the warm start spends any time
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(cfg.reward_backbone).get_vocab() != tok.get_vocab():
            raise ValueError(f"reward_backbone {cfg.reward_backbone}: its tokenizer differs from the policy's "
                             f"({cfg.model.name}); the discriminator reads pi_old on the reward model's tokens, "
                             "so both must share one tokenizer (e.g. two sizes of one model family)")
    rm_cfg = reward_model_config(cfg.reward, drv.sep, cfg.model.max_length)
    learner = PolicyLearner.options(num_cpus=cfg.learner.num_cpus_per_worker,
                                    num_gpus=cfg.learner.num_gpus_per_worker).remote(
        str(init / "policy"), cfg.sft.lr, 0, 1, f"127.0.0.1:{free_port()}",
        replace(cfg.learner, num_workers=1, threads=cfg.learner.sft_threads or cfg.learner.threads), drv.sep,
        cfg.model.max_length)
    deadline = time.monotonic() + 60 * cfg.sft.minutes
    rng = random.Random(cfg.seed)
    steps = 0
    for step in tqdm(range(cfg.sft.max_steps), desc="sft", mininterval=2):
        if time.monotonic() > deadline:
            break
        batch = rng.sample(drv.train, min(cfg.sft.batch_size, len(drv.train)))
        m = ray.get(learner.sft_step.remote([(d.prompt, d.steps) for d in batch]))
        steps = step + 1
        if step % 25 == 0:
            drv.log({"phase": "sft", "step": step, **m})
    drv.state["sft_steps"] = steps
    drv.log({"phase": "sft", "event": "sft_done", "steps": steps})
    ray.get(learner.save.remote(str(init / "sft_policy")))
    ray.kill(learner)
    sft = init / "sft_policy"
    # The reward model's backbone: the SFT policy, or the given one (its tokenizer was checked equal to `tok`).
    backbone, _ = load_policy(ModelConfig(name=cfg.reward_backbone or str(sft)))
    RewardModel(backbone, tok, rm_cfg).save_pretrained(init / "reward_model")
    return sft, init / "reward_model"
