"""``POST /v1/search``: reward-guided search on the server, with the replica's policy sampling and its live
reward model ranking (``search.step_search``: Best-of-N, step-level beam search, greedy).

    {"prompt": "..." | "prompts": [...], "method": "beam", "beam_width": 2, "expand": 2, "aggregation": "min"}
    -> {"results": [{"prompt", "completion", "steps", "step_scores", "score", "finished", "answer",
                     "tokens_generated", "candidates": [...]}], "method", "version"}

Only a server started with a policy (``dense-irl serve --policy PATH [--policy-engine vllm]``,
``ServeArgs.policy``, ``ServeArgs.policy_engine``) searches; others
answer 501. A request's samples (prompts x ``n``, or prompts x ``beam_width`` x ``expand`` per step) and its
token budgets are limited (413, naming the limit). One search generates at a time per replica (a lock), in a
worker thread, so scoring requests keep being served meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import HTTPException
from pydantic import BaseModel, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from dense_irl.errors import ConfigError
from dense_irl.search.config import SearchConfig
from dense_irl.search.step_search import Candidate, reward_model_scorer, search
from dense_irl.serving.schemas import NOT_BLANK, JsonInt, explicit_null, request_config, search_defaults


def policy_engine(policy: str, engine: str, device: str, gpu_share: float):
    """The replica's sampler for /v1/search: transformers (``hf``) or vLLM in the replica's process (``vllm``,
    given half of the replica's GPU share: the reward model shares the GPU)."""
    if engine == "vllm":
        from dense_irl.sampling.engines import RolloutConfig, VLLMEngine

        return VLLMEngine(policy, cfg=RolloutConfig(engine="vllm"), gpu_share=gpu_share / 2 if gpu_share else 1.0)
    from dense_irl.sampling.engines import HFEngine

    return HFEngine(policy, device=device)


NO_POLICY = ("this server has no policy to sample from: start it with `dense-irl serve --policy PATH` "
             "(ServeArgs.policy) to use /v1/search")


class SearchRequest(BaseModel):
    """One search: the prompt(s) and the fields of ``search.config.SearchConfig``."""

    # The schema states the validators' rules: one of prompt and prompts; a sampling method samples (T > 0).
    model_config = request_config(json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["prompts"]}],
        "if": {"not": {"required": ["method"], "properties": {"method": {"const": "greedy"}}}},
        "then": {"properties": {"temperature": {"exclusiveMinimum": 0}}}})

    # (the schema states what the validator checks; the validator's message says why)
    prompt: str | SkipJsonSchema[None] = Field(None, json_schema_extra={"pattern": NOT_BLANK})
    prompts: Annotated[list[Annotated[str, Field(json_schema_extra={"pattern": NOT_BLANK})]], Field(min_length=1)] | \
        SkipJsonSchema[None] = None
    method: Literal["best_of_n", "beam", "greedy"] = "best_of_n"
    n: JsonInt = Field(4, ge=1, description="best_of_n: chains sampled per prompt")
    beam_width: JsonInt = Field(2, ge=1, description="beam: partial chains kept after each step")
    expand: JsonInt = Field(2, ge=1, description="beam: next steps sampled from each kept chain")
    max_steps: JsonInt = Field(16, ge=1, description="beam: steps per chain at most")
    aggregation: Literal["min", "last", "sum", "mean"] = "min"
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: JsonInt = Field(256, ge=1, description="best_of_n / greedy: tokens per chain")
    max_step_tokens: JsonInt = Field(64, ge=1, description="beam: tokens per step")
    # the engines seed torch / vLLM with seed + a sample's index: a 32-bit seed keeps that inside their range
    seed: JsonInt = Field(0, ge=0, le=2**32 - 1, description="sampling seed")

    @model_validator(mode="after")
    def _one_of(self) -> SearchRequest:
        explicit_null(self, ("prompt", "prompts"))
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' and 'prompts'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' must be non-empty")
        if self.prompts is not None and any(not p.strip() for p in self.prompts):
            raise ValueError("every prompt must be non-empty")
        return self

    def config(self) -> SearchConfig:
        return SearchConfig(**self.model_dump(exclude={"prompt", "prompts"}))


def fit_defaults(body: SearchRequest, max_search_tokens: int) -> SearchRequest:
    """``body`` with the token fields it leaves out fitted to the server's limit (``schemas.search_defaults``)."""
    given = body.model_fields_set
    fitted = search_defaults(max_search_tokens, body.max_step_tokens if "max_step_tokens" in given else None,
                             body.max_steps if "max_steps" in given else None)
    return body.model_copy(update={k: v for k, v in fitted.items() if k not in given})


def _samples(body: SearchRequest, n_prompts: int) -> int:
    per = {"best_of_n": body.n, "beam": body.beam_width * body.expand, "greedy": 1}[body.method]
    return n_prompts * per


def check_limits(body: SearchRequest, args) -> list[str]:
    """The request's prompts, after the limits (413 naming the limit)."""
    prompts = body.prompts if body.prompts is not None else [body.prompt]
    if len(prompts) > args.max_chains:
        raise HTTPException(413, f"{len(prompts)} prompts in one request, over the limit max_chains={args.max_chains}")
    for i, p in enumerate(prompts):
        if len(p) > args.max_chars:
            raise HTTPException(413, f"prompts[{i}] has {len(p)} characters, over the limit max_chars={args.max_chars}")
    samples = _samples(body, len(prompts))
    if samples > args.max_search_samples:
        raise HTTPException(413, f"the search samples {samples} chains at once, over the limit "
                                 f"max_search_samples={args.max_search_samples}")
    beam = body.method == "beam"
    tokens = body.max_step_tokens * body.max_steps if beam else body.max_new_tokens
    if tokens > args.max_search_tokens:
        what = "max_step_tokens x max_steps" if beam else "max_new_tokens"
        raise HTTPException(413, f"the search may generate {tokens} tokens per chain ({what}), over the limit "
                                 f"max_search_tokens={args.max_search_tokens}")
    return prompts


def _candidate(c: Candidate) -> dict:
    return {"steps": c.steps, "step_scores": c.step_scores, "score": c.score if c.steps else None,
            "finished": c.finished, "answer": c.answer}


async def respond(body: SearchRequest, engine, rm, version: str, lock: asyncio.Lock, args) -> dict:
    """Run the search of ``body`` with ``engine`` sampling and ``rm`` ranking; the response body."""
    if engine is None:
        raise HTTPException(501, NO_POLICY)
    body = fit_defaults(body, args.max_search_tokens)
    cfg = body.config()
    try:
        cfg.check()
    except ConfigError as e:
        raise HTTPException(422, str(e)) from e
    prompts = check_limits(body, args)
    sep = rm.config.separator
    async with lock:
        results = await asyncio.to_thread(search, engine, reward_model_scorer(rm, args.forward_batch_size),
                                          prompts, cfg, sep, args.forward_batch_size)
    return {"method": cfg.method, "version": version, "config": asdict(cfg), "results": [
        {"prompt": r.prompt, "completion": r.best.completion(sep), **_candidate(r.best),
         "tokens_generated": r.tokens_generated, "candidates": [_candidate(c) for c in r.candidates]}
        for r in results]}
