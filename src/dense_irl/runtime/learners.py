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


def free_port() -> int:
    """A free TCP port on the loopback interface (for the process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Learner:
    """Shared set-up: process group, model wrapping and the optimiser step for either backend."""

    def _setup(self, model: torch.nn.Module, lr: float, rank: int, world: int, master: str,
               cfg: LearnerConfig, warmup_steps: int = 0) -> None:
        """``warmup_steps``: the learning rate rises linearly from 0 over that many steps (a fresh Adam's first
        steps move every weight by about ``lr``, which knocks a converged warm start off its optimum)."""
        import torch.distributed as dist

        self.sched = None

        torch.set_num_threads(cfg.threads)
        self.rank, self.world, self.backend = rank, world, cfg.backend
        device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        host, port = master.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0")
        if cfg.backend == "deepspeed":
            import deepspeed

            if device == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": cfg.zero_stage},
                "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
            }
            if warmup_steps > 0:
                ds_config["scheduler"] = {"type": "WarmupLR", "params": {
                    "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps,
                    "warmup_type": "linear"}}
            self.engine, self.opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                               config=ds_config)
            self.module = self.engine.module
            return
        if cfg.backend != "torch":
            raise ValueError(f"learner.backend must be 'torch' or 'deepspeed', got {cfg.backend!r}")
        model.to(self.device)
        if world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
            self.engine = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        else:
            self.engine = model
        self.module = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        if warmup_steps > 0:
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / warmup_steps))

    def _step(self, loss: torch.Tensor) -> None:
        if self.backend == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()
            return
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def _gathered(self):
        """A context in which every parameter is whole (ZeRO-3 partitions them across ranks)."""
        if self.backend == "deepspeed" and self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _full_state_dict(self) -> dict:
        """Full weights on CPU, for weight sync and checkpoints."""
        with self._gathered():
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save_optimizer(self, path: str) -> None:
        """The optimiser's moments and the warm-up schedule into ``path`` (call on every rank), so that a
        resumed run takes the very step the stopped one would have taken."""
        if self.backend == "deepspeed":  # every rank writes its ZeRO partition
            self.engine.save_checkpoint(path, tag="optimizer")
        elif self.rank == 0:  # data-parallel ranks hold the same state
            Path(path).mkdir(parents=True, exist_ok=True)
            torch.save({"optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict() if self.sched is not None else None},
                       Path(path) / "optimizer.pt")

    def load_optimizer(self, path: str) -> None:
        """The state :meth:`save_optimizer` wrote (same backend and number of ranks)."""
        if self.backend == "deepspeed":
            loaded, _ = self.engine.load_checkpoint(path, tag="optimizer", load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if loaded is None:
                raise FileNotFoundError(f"no DeepSpeed optimiser state in {path} (written by another backend?)")
            return
        file = Path(path) / "optimizer.pt"
        if not file.is_file():
            raise FileNotFoundError(f"no optimiser state at {file} (written by learner.backend=deepspeed?)")
        state = torch.load(file, weights_only=False)
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state["scheduler"] is not None:
            self.sched.load_state_dict(state["scheduler"])

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
    start), and the optimiser."""

    def __init__(self, policy_path: str, lr: float, rank: int, world: int, master: str, cfg: LearnerConfig,
                 separator: str, max_length: int, reference_path: str | None = None, warmup_steps: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(policy_path)
        ref = AutoModelForCausalLM.from_pretrained(reference_path) if reference_path else copy.deepcopy(model)
        self.ref = ref.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.separator, self.max_length = separator, max_length
        self._setup(model, lr, rank, world, master, cfg, warmup_steps)
        self.ref.to(self.device)

    def sft_step(self, chains: list) -> dict:
        """One next-token step on expert chains (the warm start)."""
        from dense_irl.irl.objectives import expert_nll
        from dense_irl.models.chains import encode_chains

        self.engine.train()
        enc = encode_chains(self.tokenizer, chains, self.max_length, self.separator)
        ids = enc.input_ids.to(self.device)
        logits = self.engine(input_ids=ids, attention_mask=enc.attention_mask.to(self.device)).logits
        loss = expert_nll(logits, ids, (enc.step_ids >= 0).to(self.device))
        self._step(loss)
        return {"sft_nll": loss.item()}

    def ppo_steps(self, rollouts: list[dict], n_steps: int, clip: float, kl_coef: float,
                  experts: list | None = None, ptx_coef: float = 0.0) -> dict:
        """``n_steps`` PPO-clip steps on this rank's rollouts (token ids and per-step advantages).

        The "old" log-probs are recomputed here, once, with the weights that sampled the rollouts
        (the engines' own log-probs can differ by kernels, warpers and temperature). With ``ptx_coef`` > 0
        each step adds ``ptx_coef`` * the expert NLL of ``experts`` (prompt, steps) chains (PPO-ptx):
        one forward pass over both batches, so data-parallel backends see one forward per backward.
        """
        import torch.nn.functional as F

        from dense_irl.irl.objectives import expert_nll
        from dense_irl.models.chains import encode_chains, token_logprobs
        from dense_irl.rl.ppo import policy_batch, ppo_loss

        batch = policy_batch(self.tokenizer, rollouts, self.separator, self.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            old_logp = token_logprobs(self.module(input_ids=ids, attention_mask=mask).logits, ids)
            ref_logp = token_logprobs(self.ref(input_ids=ids, attention_mask=mask).logits, ids)
        B, T = ids.shape
        all_ids, all_mask, e_ids = ids, mask, None
        if ptx_coef > 0 and experts:
            enc = encode_chains(self.tokenizer, experts, self.max_length, self.separator)
            e_ids, e_mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
            e_tokens = (enc.step_ids >= 0).to(self.device)
            width = max(T, e_ids.shape[1])  # right padding: positions stay those of unpadded rows
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            all_ids = torch.cat([F.pad(ids, (0, width - T), value=pad), F.pad(e_ids, (0, width - e_ids.shape[1]),
                                                                                value=pad)])
            all_mask = torch.cat([F.pad(mask, (0, width - T)), F.pad(e_mask, (0, width - e_mask.shape[1]))])
        self.engine.train()
        stats: dict = {}
        for _ in range(n_steps):
            logits = self.engine(input_ids=all_ids, attention_mask=all_mask).logits
            logp = token_logprobs(logits[:B, :T], ids)
            loss, stats = ppo_loss(logp, old_logp, ref_logp, batch["advantages"], batch["mask"], clip, kl_coef)
            if e_ids is not None:
                nll = expert_nll(logits[B:, : e_ids.shape[1]], e_ids, e_tokens)
                loss = loss + ptx_coef * nll
                stats["ptx_nll"] = nll.item()
            self._step(loss)
            stats["policy_loss"] = loss.item()
        behaviour = batch["old_logp"][batch["mask"]]
        stats["behaviour_logp_gap"] = (old_logp[batch["mask"]] - behaviour).abs().mean().item()
        return stats

    def state_dict(self) -> dict:
        return self._full_state_dict()

    def weight_spec(self) -> list:
        from dense_irl.runtime.weight_sync import spec_of

        return spec_of(self._full_state_dict())

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
                save_policy(self.module, self.tokenizer, path)


@ray.remote
class RewardLearner(_Learner):
    """Holds the reward model (trained) and the frozen pi_old of the AIRL logit."""

    def __init__(self, reward_path: str, policy_path: str, reward_cfg, lr: float, rank: int, world: int,
                 master: str, cfg: LearnerConfig):
        from transformers import AutoModelForCausalLM

        from dense_irl.models.reward_model import RewardModel

        self.rm = RewardModel.from_pretrained(reward_path)
        self.pi_old = AutoModelForCausalLM.from_pretrained(policy_path).eval().requires_grad_(False)
        self.reward_cfg = reward_cfg
        self._setup(self.rm, lr, rank, world, master, cfg, reward_cfg.warmup_steps)
        self.pi_old.to(self.device)

    def reward_step(self, experts: list, negatives: list) -> dict:
        """One discriminator step on this rank's experts and negatives."""
        from dense_irl.irl.offline import reward_loss

        self.rm.train()
        loss, metrics = reward_loss(self.rm, self.pi_old, experts, negatives, self.reward_cfg, self.engine)
        self._step(loss)
        return metrics

    def update_pi_old(self, state_dict: dict) -> None:
        """pi_old of the AIRL logit follows the policy being trained."""
        self.pi_old.load_state_dict(state_dict)

    def receive_pi_old(self, spec: list) -> None:
        """pi_old from the weight group's broadcast (``rollout.weight_sync: collective``)."""
        from dense_irl.runtime.weight_sync import receive

        self.pi_old.load_state_dict(receive(self.weight_group, spec, self.weight_device))

    def score(self, chains: list) -> list[list[float]]:
        return [s.step_rewards for s in self.rm.score(chains)]

    def set_threshold(self, threshold: float, rule: str) -> None:
        self.rm.config.threshold, self.rm.config.threshold_rule = threshold, rule

    def save(self, path: str, version: str) -> None:
        self.rm.config.version = version
        with self._gathered():
            if self.rank == 0:
                self.rm.save_pretrained(path)
