"""The online run's warm start: a policy of ``cfg.model`` trained by SFT on the demonstrations (the one SFT loop
of ``algo.sft``, its steps on one learner of the learners' kind: backend, GPU share), and the reward model
initialised from it (or from ``reward_backbone``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ray

from dense_irl.algo.config import reward_model_config
from dense_irl.algo.sft import train_sft
from dense_irl.errors import ConfigError
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.runtime.learners import PolicyLearner, RankSpec, free_port


def warm_start(drv) -> tuple[Path, Path]:
    """SFT for ``sft.max_steps`` steps (capped at ``sft.minutes``); returns the SFT policy's and the initial reward
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
            raise ConfigError(f"reward_backbone {cfg.reward_backbone}: its tokenizer differs from the policy's "
                              f"({cfg.model.name}); the discriminator reads pi_old on the reward model's tokens, "
                              "so both must share one tokenizer (e.g. two sizes of one model family)")
    learner_cfg = replace(cfg.learner, num_workers=1, threads=cfg.learner.sft_threads or cfg.learner.threads)
    learner = PolicyLearner.options(num_cpus=cfg.learner.num_cpus_per_worker,
                                    num_gpus=cfg.learner.num_gpus_per_worker).remote(
        str(init / "policy"), learner=learner_cfg, layout=drv.layout, opt=cfg.sft, total_steps=cfg.sft.max_steps,
        model=cfg.model, group=RankSpec(master=f"127.0.0.1:{free_port()}"))
    done = train_sft(lambda chains: ray.get(learner.sft_step.remote(chains)), drv.train, cfg.sft, seed=cfg.seed,
                     log=drv.log, log_every=cfg.log_every)
    drv.state["sft_steps"] = done["steps"]
    drv.log({"phase": "sft", "event": "sft_done", "steps": done["steps"]})
    sft = init / "sft_policy"
    ray.get(learner.save.remote(str(sft)))
    ray.kill(learner)
    # The reward model's backbone: the SFT policy, or the given one (its tokenizer was checked equal to `tok`).
    backbone, _ = load_policy(ModelConfig(name=cfg.reward_backbone or str(sft)))
    rm_cfg = reward_model_config(cfg.reward, drv.layout.separator, drv.layout.max_length)
    RewardModel(backbone, tok, rm_cfg).save_pretrained(init / "reward_model")
    return sft, init / "reward_model"
