"""Learners: Ray actor groups that train the policy and the reward model, data-parallel over N workers.

Backend ``torch``: plain PyTorch, DistributedDataParallel over gloo (CPU) or NCCL (GPU) when N > 1.
Backend ``deepspeed``: a DeepSpeed engine with ZeRO stage 1-3 (on CPU with gloo and torch Adam).
The driver sends each worker its shard of a batch; gradients are averaged by the backend, so every
rank holds the same weights and rank 0 speaks for the group (weights, checkpoints).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from dense_irl.algo.batches import Experience, RewardBatch
from dense_irl.algo.config import RewardConfig, RLConfig
from dense_irl.algo.optim import MAX_GRAD_NORM, Optimizer
from dense_irl.data.layout import ChainLayout
from dense_irl.errors import CheckpointError, ConfigError
from dense_irl.models.factory import ModelConfig
from dense_irl.runtime.timing import ComputeClock, timed


@dataclass
class LearnerConfig:
    """How the learners run."""

    backend: str = "torch"  # "torch" or "deepspeed"
    num_workers: int = 1  # data-parallel ranks per role
    num_cpus_per_worker: float = 0.5
    num_gpus_per_worker: float = 0.0
    zero_stage: int = 2  # deepspeed only
    threads: int = 1  # torch CPU threads per worker
    sft_threads: int = 0  # torch CPU threads of the warm-start learner, alone on its node then (0: threads)

    def check(self) -> None:
        """Raise a ConfigError naming the first bad option."""
        if self.backend not in ("torch", "deepspeed"):
            raise ConfigError(f"learner.backend must be 'torch' or 'deepspeed', got {self.backend!r}")
        if self.backend == "deepspeed" and self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"learner.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ConfigError(f"learner.num_workers must be >= 1, got {self.num_workers}")


@dataclass(frozen=True)
class RankSpec:
    """Where one learner sits in its role's data-parallel group (``master``: the rendezvous "host:port")."""

    rank: int = 0
    world: int = 1
    master: str = "127.0.0.1:29500"


def free_port() -> int:
    """A free TCP port on the loopback interface (for the process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Learner(ComputeClock):
    """Shared set-up: process group, model wrapping and the optimiser step for either backend."""

    def _setup(self, model: torch.nn.Module, opt, total_steps: int, cfg: LearnerConfig, group: RankSpec,
               model_cfg: ModelConfig) -> None:
        """The optimiser of ``algo.optim`` over the trainable parameters (torch), or its recipe in a DeepSpeed
        engine: AdamW, clipping, and ``opt``'s lr schedule (``opt``: an SFT / reward / RL config) over
        ``total_steps``; micro-batches accumulate through ``self.acc`` (``algo.microbatch``)."""
        import torch.distributed as dist

        from dense_irl.algo.microbatch import Accumulator
        from dense_irl.algo.optim import lr_lambda
        from dense_irl.models.training import autocast_dtype

        torch.set_num_threads(cfg.threads)
        self.rank, self.world, self.backend = group.rank, group.world, cfg.backend
        self.micro_batch_tokens = opt.micro_batch_tokens
        device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        amp = autocast_dtype(model_cfg.precision, self.device)
        host, port = group.master.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, RANK=str(group.rank),
                          WORLD_SIZE=str(group.world), LOCAL_RANK="0")
        params = [p for p in model.parameters() if p.requires_grad]
        schedule = lr_lambda(opt.warmup_steps, opt.lr_schedule, total_steps, opt.min_lr_ratio)
        if cfg.backend == "deepspeed":
            import deepspeed

            if device == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": MAX_GRAD_NORM,
                "zero_optimization": {"stage": cfg.zero_stage},
                "optimizer": {"type": "AdamW", "params": {"lr": opt.lr, "weight_decay": 0.0, "torch_adam": True}},
            }
            if amp is not None:  # the engine switches an outer autocast off unless its config enables it
                ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=params, config=ds_config,
                lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
            self.module = self.engine.module
            self.acc = Accumulator(self.engine, backend="deepspeed", autocast_dtype=amp, device_type=device)
            return
        model.to(self.device)
        if group.world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=group.rank, world_size=group.world)
            self.engine = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        else:
            self.engine = model
        self.module = model
        self.optim = Optimizer(params, opt.lr, opt.warmup_steps, opt.lr_schedule, total_steps, opt.min_lr_ratio)
        self.acc = Accumulator(self.engine, self.optim, autocast_dtype=amp, device_type=device)

    def _gathered(self):
        """A context in which every parameter is whole (ZeRO-3 partitions them across ranks)."""
        if self.backend == "deepspeed" and self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _full_state_dict(self) -> dict:
        """Full serving weights on CPU (LoRA adapters merged in), for weight sync and checkpoints."""
        from dense_irl.models.training import merged_state_dict

        with self._gathered():
            return merged_state_dict(self.module)

    def save_optimizer(self, path: str) -> None:
        """The optimiser's moments and the warm-up schedule into ``path`` (call on every rank), so that a
        resumed run takes the very step the stopped one would have taken."""
        if self.backend == "deepspeed":  # every rank writes its ZeRO partition
            self.engine.save_checkpoint(path, tag="optimizer")
        elif self.rank == 0:  # data-parallel ranks hold the same state
            Path(path).mkdir(parents=True, exist_ok=True)
            torch.save(self.optim.state_dict(), Path(path) / "optimizer.pt")

    def load_optimizer(self, path: str) -> None:
        """The state :meth:`save_optimizer` wrote (same backend and number of ranks)."""
        if self.backend == "deepspeed":
            loaded, _ = self.engine.load_checkpoint(path, tag="optimizer", load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if loaded is None:
                raise CheckpointError(f"no DeepSpeed optimiser state in {path} (written by another backend?)")
            return
        file = Path(path) / "optimizer.pt"
        if not file.is_file():
            raise CheckpointError(f"no optimiser state at {file} (written by learner.backend=deepspeed?)")
        self.optim.load_state_dict(torch.load(file, weights_only=False))

    def join_weight_group(self, master: str, rank: int, world: int, backend: str) -> None:
        """Join the stand-alone broadcast group of the weight sync (``rollout.weight_sync: collective``)."""
        from dense_irl.runtime.weight_sync import make_group

        self.weight_group = make_group(master, rank, world, backend)
        self.weight_device = "cuda" if backend == "nccl" else "cpu"

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@ray.remote
class PolicyLearner(_Learner):
    """Holds the policy (trained), its frozen KL reference (``reference_path``, else a copy of the policy at
    start), and the optimiser (``lr``, warmed up over ``warmup_steps``)."""

    def __init__(self, policy_path: str, *, learner: LearnerConfig, layout: ChainLayout, opt, total_steps: int = 0,
                 model: ModelConfig | None = None, group: RankSpec = RankSpec(), reference_path: str | None = None):
        from dense_irl.models.hf_files import load_causal_lm, load_tokenizer
        from dense_irl.models.training import load_trainable, merged

        model_cfg = model or ModelConfig()
        policy = load_trainable(policy_path, model_cfg)
        ref = (load_causal_lm(reference_path, "KL reference policy") if reference_path
               else copy.deepcopy(merged(policy)))
        self.ref = ref.eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(policy_path, "policy")
        self.layout = layout
        self._setup(policy, opt, total_steps, learner, group, model_cfg)
        self.ref.to(self.device)

    def sft_step(self, chains: list) -> dict:
        """One next-token step on expert chains (the warm start): ``algo.sft.sft_loss``."""
        from dense_irl.algo.sft import sft_loss

        self.engine.train()
        loss, tokens = sft_loss(self.engine, self.tokenizer, chains, self.layout, self.device, acc=self.acc,
                                max_tokens=self.micro_batch_tokens)
        self.acc.step()
        return {"sft_nll": float(loss), "tokens": tokens}

    @timed
    def policy_step(self, experience: Experience, rl: RLConfig) -> dict:
        """``rl.ppo_steps`` steps of ``algo.losses.policy_loss`` on this rank's experience.

        The "old" log-probs are recomputed here, once, with the weights that sampled the rollouts (the
        engines' own log-probs can differ by kernels, warpers and temperature). With ``rl.ptx_coef`` > 0 the
        experience's demonstrations add their expert NLL (PPO-ptx). Rollouts and demonstrations run in
        length-grouped micro-batches of ``rl.micro_batch_tokens``, accumulated into one step.
        """
        from dense_irl.algo.losses import expert_nll, nll_count, policy_loss
        from dense_irl.algo.microbatch import micro_batches, plan, row_lengths, select_rows
        from dense_irl.data.layout import encode_chains
        from dense_irl.models.chains import token_logprobs

        batch = experience.tensors(self.tokenizer, self.layout.separator, "cpu")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        n_tokens = float(batch["mask"].sum())
        groups = [(g, "rollouts") for g in micro_batches(lengths, self.micro_batch_tokens)]
        old_logp, ref_logp = torch.zeros(ids.shape), torch.zeros(ids.shape)
        self.module.eval()  # no dropout in the old policy's log-probs
        with torch.no_grad():  # (every rank runs as many passes: ZeRO-3 gathers parameters in each)
            for (g, _), _w in plan(self.acc, groups):
                T, dev = max(lengths[i] for i in g), self.device
                with self.acc.micro(True):  # (autocast only: nothing is backpropagated here)
                    gi, gm = ids[g, :T].to(dev), mask[g, :T].to(dev)
                    old_logp[g, :T] = token_logprobs(self.module(input_ids=gi, attention_mask=gm).logits, gi).cpu()
                    ref_logp[g, :T] = token_logprobs(self.ref(input_ids=gi, attention_mask=gm).logits, gi).cpu()
        enc = None
        if rl.ptx_coef > 0 and experience.experts:
            enc = encode_chains(self.tokenizer, experience.experts, self.layout.max_length, self.layout.separator)
            n_expert = nll_count(enc.step_ids >= 0)
            groups += [(g, "experts") for g in micro_batches(row_lengths(enc), self.micro_batch_tokens)]
        self.engine.train()
        stats: dict = {}
        for _ in range(rl.ppo_steps):
            stats = {}
            steps = plan(self.acc, groups)
            for j, ((g, kind), weight) in enumerate(steps):
                with self.acc.micro(j == len(steps) - 1):
                    if kind == "rollouts":
                        T = max(lengths[i] for i in g)
                        gi, gm = ids[g, :T].to(self.device), mask[g, :T].to(self.device)
                        logits = self.engine(input_ids=gi, attention_mask=gm).logits
                        loss, part = policy_loss(
                            token_logprobs(logits, gi), old_logp[g, :T].to(self.device),
                            ref_logp[g, :T].to(self.device), batch["advantages"][g, :T].to(self.device),
                            batch["mask"][g, :T].to(self.device), rl.clip, rl.kl_coef, normaliser=n_tokens)
                    else:
                        sub = select_rows(enc, g)
                        e_ids = sub.input_ids.to(self.device)
                        logits = self.engine(input_ids=e_ids, attention_mask=sub.attention_mask.to(self.device)).logits
                        nll = expert_nll(logits, e_ids, (sub.step_ids >= 0).to(self.device), n_expert)
                        loss, part = rl.ptx_coef * nll, {"ptx_nll": nll.item(), "policy_loss": rl.ptx_coef * nll.item()}
                    self.acc.backward(weight * loss)
                for k, v in part.items():
                    stats[k] = stats.get(k, 0.0) + weight * v
            self.acc.step()
        behaviour = batch["old_logp"][batch["mask"]]
        stats["behaviour_logp_gap"] = (old_logp[batch["mask"]] - behaviour).abs().mean().item()
        return stats

    @timed
    def state_dict(self) -> dict:
        return self._full_state_dict()

    def weight_spec(self) -> list:
        from dense_irl.runtime.weight_sync import spec_of

        return spec_of(self._full_state_dict())

    @timed
    def broadcast_weights(self) -> None:
        """Send the full weights to the weight group (rank 0 sends; under ZeRO-3 every rank gathers)."""
        from dense_irl.runtime.weight_sync import send

        state = self._full_state_dict()
        if self.rank == 0:
            send(self.weight_group, state, self.weight_device)

    def save(self, path: str) -> None:
        from dense_irl.models.factory import save_policy

        with self._gathered():
            if self.rank == 0:
                save_policy(self.module, self.tokenizer, path)  # adapters merged, and kept under adapter/


@ray.remote
class RewardLearner(_Learner):
    """Holds the reward model (trained) and the frozen pi_old of the AIRL logit."""

    def __init__(self, reward_path: str, pi_old_path: str, *, reward: RewardConfig, learner: LearnerConfig,
                 total_steps: int = 0, model: ModelConfig | None = None, group: RankSpec = RankSpec()):

        from dense_irl.models.hf_files import load_causal_lm
        from dense_irl.models.reward_model import RewardModel
        from dense_irl.models.training import ADAPTER_DIR, load_trainable, prepare_for_training

        model_cfg = model or ModelConfig()
        self.rm = RewardModel.from_pretrained(reward_path)
        if model_cfg.lora_r > 0 and (Path(reward_path) / ADAPTER_DIR).is_dir():  # the adapters that trained
            self.rm.backbone = load_trainable(reward_path, model_cfg)
        else:
            self.rm.backbone = prepare_for_training(self.rm.backbone, model_cfg)
        self.pi_old = load_causal_lm(pi_old_path, "policy (pi_old)").eval().requires_grad_(False)
        self.reward_cfg = reward
        self._setup(self.rm, reward, total_steps, learner, group, model_cfg)
        self.pi_old.to(self.device)
        # log pi_old per step of every chain seen since pi_old last changed: an iteration's reward steps draw
        # the same experts again and again, and pi_old stays fixed between weight pushes.
        self.pi_old_cache: dict = {}

    @timed
    def reward_step(self, batch: RewardBatch) -> dict:
        """One step of ``algo.losses.reward_loss`` on this rank's experts and negatives."""
        from dense_irl.algo.losses import loss_chains, reward_loss
        from dense_irl.models.branching import family_step_logprobs

        logp = None
        if not self.reward_cfg.gail and self.reward_cfg.objective != "iq":  # the discriminator's -log pi_old
            cfg = self.rm.config
            chains, finished = loss_chains(batch, self.reward_cfg)
            logp = family_step_logprobs(self.pi_old, self.rm.tokenizer, chains, cfg.max_length, cfg.separator,
                                        self.pi_old_cache, finished, self.micro_batch_tokens, len(batch.experts))
        self.rm.train()
        _, metrics = reward_loss(self.rm, batch, self.reward_cfg, pi_old_logp=logp, forward=self.engine, acc=self.acc,
                                 max_tokens=self.micro_batch_tokens)
        metrics["grad_norm"] = self.acc.step()
        return metrics

    @timed
    def update_pi_old(self, state_dict: dict) -> None:
        """pi_old of the AIRL logit follows the policy being trained."""
        self.pi_old.load_state_dict(state_dict)
        self.pi_old_cache.clear()

    @timed
    def receive_pi_old(self, spec: list) -> None:
        """pi_old from the weight group's broadcast (``rollout.weight_sync: collective``)."""
        from dense_irl.runtime.weight_sync import receive

        self.pi_old.load_state_dict(receive(self.weight_group, spec, self.weight_device))
        self.pi_old_cache.clear()

    @timed
    def score(self, chains: list) -> list[list[float]]:
        return [s.step_rewards for s in self.rm.score(chains)]

    def set_threshold(self, threshold: float, rule: str) -> None:
        self.rm.config.threshold, self.rm.config.threshold_rule = threshold, rule

    def save(self, path: str, version: str) -> None:
        self.rm.config.version = version
        with self._gathered():
            if self.rank == 0:
                self.rm.save_pretrained(path)
