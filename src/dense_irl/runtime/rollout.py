"""Rollout workers: Ray actors that sample reasoning chains from the current policy, one engine each.

The engines (``sampling/engines.py``: ``hf`` transformers ``generate``, ``vllm`` vLLM) do the sampling; the
actor gives its engine the device Ray granted it (since Ray 2.5x a 0-GPU actor still sees the node's GPUs, and
would take memory Ray does not count) and stamps every chain with the policy version it was sampled with.
"""

from __future__ import annotations

import ray
import torch

from dense_irl.algo.batches import Rollout
from dense_irl.runtime.timing import ComputeClock, timed
from dense_irl.sampling.engines import HFEngine, RolloutConfig, VLLMEngine


@ray.remote
class RolloutWorker(ComputeClock):
    """A Ray actor around one engine; the driver holds a list of them."""

    def __init__(self, policy_path: str, *, cfg: RolloutConfig, seed: int = 0):
        cfg.check()
        torch.set_num_threads(1)
        if cfg.engine == "hf":
            self.engine = HFEngine(policy_path, seed, device="cuda" if ray.get_gpu_ids() and torch.cuda.is_available()
                                   else "cpu")
        else:
            share = ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0) / cfg.tensor_parallel_size
            self.engine = VLLMEngine(policy_path, seed, cfg=cfg, gpu_share=share)
        self.version = 0

    @timed
    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig, separator: str,
                 seed: int | None = None) -> list[list[Rollout]]:
        groups = self.engine.generate(prompts, n, cfg, separator, seed)
        for group in groups:
            for c in group:
                c.policy_version = self.version
        return groups

    @timed
    def update_weights(self, state_dict: dict, version: int) -> int:
        self.engine.update_weights(state_dict)
        self.version = version
        return version

    def join_weight_group(self, master: str, rank: int, world: int, backend: str) -> None:
        """Join the stand-alone broadcast group of the weight sync (``weight_sync: collective``)."""
        from dense_irl.runtime.weight_sync import make_group

        self.weight_group = make_group(master, rank, world, backend)
        self.weight_device = "cuda" if backend == "nccl" else "cpu"

    @timed
    def receive_weights(self, spec: list, version: int) -> int:
        """New weights from the policy learner's broadcast."""
        from dense_irl.runtime.weight_sync import receive

        return self.update_weights(receive(self.weight_group, spec, self.weight_device), version)

    def ping(self) -> int:
        return self.version
