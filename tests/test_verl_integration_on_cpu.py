"""verl's reward-manager interface, with the installed verl package's own DataProto and registry:
dense-irl step rewards land on each step's last response token (or spread over the step)."""

from __future__ import annotations

import pytest
import torch

verl = pytest.importorskip("verl", reason="make test installs verl (--no-deps) with tensordict and omegaconf")

from verl import DataProto  # noqa: E402
from verl.workers.reward_manager import get_reward_manager_cls  # noqa: E402

from dense_irl.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dense_irl.integrations.token_rewards import step_end_tokens  # noqa: E402
from dense_irl.models.factory import ModelConfig, load_policy  # noqa: E402
from dense_irl.models.reward_model import RewardModel, RewardModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    demos = generate(SyntheticConfig(n_problems=60, seed=3))
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    policy, tok = load_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), texts)
    rm = RewardModel(policy, tok, RewardModelConfig(terms="lm+heads"))
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.g_head.weight, std=0.5)
    path = tmp_path_factory.mktemp("rm") / "rm"
    rm.save_pretrained(path)
    return str(path), demos[:4], tok


def _batch(tok, demos, P=192, R=128):
    """A verl rollout batch: chat-templated prompts left-padded to P, responses right-padded to R."""
    prompts, responses, masks = [], [], []
    for d in demos:
        p = tok(f"<|im_start|>user\n{d.prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        r = tok("\n".join(d.steps), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        p, r = p[-P:], r[:R]
        prompts.append([tok.pad_token_id] * (P - len(p)) + p)
        responses.append(r + [tok.pad_token_id] * (R - len(r)))
        masks.append([0] * (P - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (R - len(r)))
    return DataProto.from_dict(tensors={"prompts": torch.tensor(prompts), "responses": torch.tensor(responses),
                                        "attention_mask": torch.tensor(masks)},
                               non_tensors={"data_source": ["gsm8k"] * len(demos)})


def test_registered_manager_gives_step_rewards_on_the_steps_last_tokens(checkpoint):
    import dense_irl.integrations.verl  # noqa: F401  (registers "dense_irl")

    path, demos, tok = checkpoint
    cls = get_reward_manager_cls("dense_irl")
    manager = cls(tokenizer=tok, num_examine=0, compute_score=None, reward_fn_key="data_source", reward_model=path)
    data = _batch(tok, demos)
    out = manager(data, return_dict=True)
    rewards = out["reward_tensor"]
    assert rewards.shape == data.batch["responses"].shape and rewards.dtype == torch.float32
    want = RewardModel.from_pretrained(path).score([(d.prompt, d.steps) for d in demos])
    for i, (d, w) in enumerate(zip(demos, want)):
        n_resp = int(data.batch["attention_mask"][i, 192:].sum())
        steps, ends = step_end_tokens(tok, data.batch["responses"][i, :n_resp].tolist(), "\n")
        assert steps == d.steps  # the response is read back into the demonstration's steps
        nonzero = rewards[i].nonzero()[:, 0].tolist()
        assert set(nonzero) <= set(ends)  # rewards only on each step's last token
        assert rewards[i, ends].tolist() == pytest.approx(w.step_rewards, abs=1e-4)
        assert out["reward_extra_info"]["dense_irl_task_reward"][i] == pytest.approx(w.task_reward, abs=1e-4)
    # Spread over the step's tokens: the same sum per step, every response token of a step credited.
    spread = cls(tokenizer=tok, num_examine=0, compute_score=None, reward_model=path, place="spread")(data)
    assert spread.sum(1).tolist() == pytest.approx(rewards.sum(1).tolist(), abs=1e-3)
    n_resp = int(data.batch["attention_mask"][-1, 192:].sum())
    _, ends = step_end_tokens(tok, data.batch["responses"][-1, :n_resp].tolist(), "\n")
    assert (spread[-1, : ends[-1] + 1] != 0).all() and not spread[-1, ends[-1] + 1 :].any()


def test_bad_manager_arguments_are_named(checkpoint):
    import dense_irl.integrations.verl as integration

    path, _, tok = checkpoint
    with pytest.raises(ValueError, match="exactly one of reward_kwargs.url"):
        integration.DenseIRLRewardManager(tok, 0, None)
    with pytest.raises(ValueError, match="place must be one of"):
        integration.DenseIRLRewardManager(tok, 0, None, reward_model=path, place="first")


def _verl_config(path: str, **reward_kwargs):
    """verl 0.9's own PPO trainer config, naming the reward-loop manager by module as the README shows."""
    import importlib.resources

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(importlib.resources.files("verl") / "trainer/config/_generated_ppo_trainer.yaml")
    overrides = OmegaConf.from_dotlist([
        f"actor_rollout_ref.model.path={path}",  # the checkpoint folder holds the policy's tokenizer
        "reward.reward_manager.source=importlib",
        "reward.reward_manager.module.path=pkg://dense_irl.integrations.verl",
        "reward.reward_manager.name=DenseIRLRewardLoopManager",
    ])
    return OmegaConf.merge(cfg, overrides, {"reward": {"reward_kwargs": reward_kwargs}})


def test_reward_loop_worker_scores_each_rollout_with_the_chains_return(checkpoint):
    """verl's own RewardLoopWorker (the reward loop of verl 0.9's main_ppo) loads the manager from the
    config and scores one rollout at a time: the score is the sum of the step rewards (or min / last)."""
    import asyncio

    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    path, demos, tok = checkpoint
    want = RewardModel.from_pretrained(path).score([(d.prompt, d.steps) for d in demos])
    data = _batch(tok, demos)
    worker = RewardLoopWorker(_verl_config(path, reward_model=path))
    out = asyncio.run(worker.compute_score_batch(data))
    assert [o["reward_score"] for o in out] == pytest.approx([w.task_reward for w in want], abs=1e-4)
    info = out[0]["reward_extra_info"]
    assert info["dense_irl_steps"] == len(demos[0].steps) == info["dense_irl_steps_scored"]
    assert info["dense_irl_min_step_reward"] == pytest.approx(min(want[0].step_rewards), abs=1e-4)
    assert info["dense_irl_first_error"] == want[0].first_error
    # The agent loop's streaming call sends one rollout with its prompt unpadded.
    one = data[1:2]
    P = one.batch["prompts"].shape[-1]
    keep = one.batch["attention_mask"][0].bool()
    keep[P:] = True
    single = DataProto.from_dict(tensors={"prompts": one.batch["prompts"][:, keep[:P]],
                                          "responses": one.batch["responses"],
                                          "attention_mask": one.batch["attention_mask"][:, keep]})
    assert asyncio.run(worker.compute_score(single))["reward_score"] == pytest.approx(want[1].task_reward, abs=1e-4)
    worst = RewardLoopWorker(_verl_config(path, reward_model=path, aggregate="min"))
    assert asyncio.run(worst.compute_score(data[:1]))["reward_score"] == pytest.approx(min(want[0].step_rewards),
                                                                                        abs=1e-4)


def test_reward_loop_manager_names_bad_kwargs(checkpoint):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    path, _, _ = checkpoint
    with pytest.raises(ValueError, match=r"unknown reward.reward_kwargs \['place'\]"):
        RewardLoopWorker(_verl_config(path, reward_model=path, place="last"))
    with pytest.raises(ValueError, match="aggregate must be one of"):
        RewardLoopWorker(_verl_config(path, reward_model=path, aggregate="mean"))
    with pytest.raises(ValueError, match="exactly one of reward_kwargs.url"):
        RewardLoopWorker(_verl_config(path))


def test_example_verl_config_passes_verls_checks_and_scores(checkpoint):
    """examples/verl/dense_irl_grpo.yaml composed by Hydra over verl's own trainer config, as
    `python -m verl.trainer.main_ppo --config-path examples/verl --config-name dense_irl_grpo` does: verl's
    validate_config accepts it, and its reward workers load the manager it names."""
    import asyncio
    import warnings
    from pathlib import Path

    hydra = pytest.importorskip("hydra", reason="make test installs hydra-core (--no-deps)")
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.main_ppo import validate_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    path, demos, tok = checkpoint
    examples = Path(__file__).resolve().parents[1] / "examples" / "verl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Hydra 1.3's resolver deprecations under omegaconf 2.4
        with hydra.initialize_config_dir(config_dir=str(examples), version_base=None):
            cfg = hydra.compose(config_name="dense_irl_grpo", overrides=[
                f"actor_rollout_ref.model.path={path}", "reward.reward_kwargs.url=null",
                f"+reward.reward_kwargs.reward_model={path}"])
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert cfg.algorithm.adv_estimator == "grpo"
    out = asyncio.run(RewardLoopWorker(cfg).compute_score_batch(_batch(tok, demos[:2])))
    want = RewardModel.from_pretrained(path).score([(d.prompt, d.steps) for d in demos[:2]])
    assert [o["reward_score"] for o in out] == pytest.approx([w.task_reward for w in want], abs=1e-4)
