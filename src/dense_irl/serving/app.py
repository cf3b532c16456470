"""Step-level reward scoring over HTTP: a Ray Serve app with a FastAPI ingress (docs/architecture.md §6).

    POST /v1/score      one chain {prompt, steps | text [, step_separator]} or {"items": [...]}
    POST /get_reward    OpenRLHF's remote reward model contract {query, prompts, labels}
    POST /pooling       vLLM's pooling API (task token_classify): one [p_wrong, p_right] row per step
    POST /classify      vLLM's classify API: one score per input (verl's reward loop); serving/vllm_api.py
    POST /v1/search     reward-guided search with the replica's policy (--policy): serving/search_api.py
    GET  /health        liveness and the live checkpoint version (never needs the token)
    GET  /v1/models     which checkpoint (path, version) is live
    POST /admin/reload  {"reward_model": PATH}: load another checkpoint into every replica

Concurrent requests are gathered by ``@serve.batch`` into one ``RewardModel.score`` call: the chains of
the batch, sorted by length, ``forward_batch_size`` per forward pass, every step of a chain in the same
pass (never one pass per step prefix). A new checkpoint goes live without downtime two
ways: a new ``user_config: {reward_model: PATH}`` (``serve deploy``; Serve calls ``reconfigure`` on the
running replicas), or the admin call, which loads it in the replica that receives it and publishes it
through the small ``ModelSource`` deployment that the other replicas poll. Loading happens in a thread
and the model is swapped in one assignment, so requests in flight finish on the model they started on.

Safety: Serve binds 127.0.0.1 unless told otherwise; with a token (``args.token`` or env
``DENSE_IRL_TOKEN``) every path but /health and the docs needs ``Authorization: Bearer <token>`` (401);
the body size is checked before parsing (413), then the per-request limits (413, naming the limit);
malformed JSON, wrong types, unknown fields and empty steps are 422.
"""

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psutil
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from dense_irl.data.layout import chain_length
from dense_irl.errors import ConfigError
from dense_irl.models.reward_model import ChainScore, RewardModel, check_checkpoint
from dense_irl.serving import search_api, vllm_api
from dense_irl.serving.model_source import ModelSource
from dense_irl.serving.openapi_spec import complete_openapi, state_limits
from dense_irl.serving.requests import item_chain, query_chains
from dense_irl.serving.schemas import (
    LIMIT_NAMES,
    BatchIn,
    BatchResult,
    ChainResult,
    GetRewardRequest,
    GetRewardResponse,
    Guard,
    Health,
    ModelList,
    ReloadRequest,
    ReloadResult,
    ScoreRequest,
    ServeArgs,
    aggregate,
    chain_result,
    get_reward_answer,
)

TOKEN_ENV = "DENSE_IRL_TOKEN"
APP_NAME = "dense-irl"
logger = logging.getLogger("ray.serve")


# ---------------------------------------------------------------------------- the FastAPI app


def _replica_guard() -> tuple[str | None, int]:
    # The FastAPI app is copied into each replica, so the guard asks the replica for its settings.
    return serve.get_replica_context().servable_object.guard_settings()


async def _validation_error(_request, exc: RequestValidationError) -> JSONResponse:
    # Leave out the echoed input: it can be large, and it is what the client just sent.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


api = FastAPI(title="dense-irl step reward scoring", version="1", description=__doc__.split("\n\n")[0])
api.add_middleware(Guard, settings=_replica_guard)
api.add_exception_handler(RequestValidationError, _validation_error)


def _openapi() -> dict:
    """FastAPI's schema with every error answer, the vLLM routes' bodies and this replica's limits
    (serving/openapi_spec.py); rebuilt when the limits change (a reload to another vocabulary)."""
    try:  # in a replica (the app is copied into each): its token and limits
        scorer = serve.get_replica_context().servable_object
        token, limits = bool(scorer.args.token), scorer.schema_limits()
    except Exception:  # built outside Serve (a test, a docs build): the default settings
        token, limits = False, {n: ServeArgs.model_fields[n].default for n in LIMIT_NAMES}
    if api.openapi_schema is None or api.openapi_schema.get("x-dense-irl-limits") != limits:
        spec = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        bodies = {"/pooling": vllm_api.PoolingIn, "/classify": vllm_api.ClassifyIn}
        api.openapi_schema = state_limits(complete_openapi(spec, bodies, token), limits)
    return api.openapi_schema


api.openapi = _openapi


def _too_large(message: str) -> HTTPException:
    return HTTPException(413, message)


# ---------------------------------------------------------------------------- deployments


@dataclass(frozen=True)
class _Live:
    rm: RewardModel
    path: str
    version: str
    loaded_at: float


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=120)  # a search may take a while
@serve.ingress(api)
class RewardScorer:
    """Scores chains with the live reward model; see the module docstring for the endpoints."""

    def __init__(self, source, args: dict):
        self.args = ServeArgs.model_validate(args)
        self.source = source
        self.device = "cuda" if self.args.num_gpus > 0 else "cpu"
        self._lock = asyncio.Lock()
        self._user_config = {"reward_model": self.args.reward_model}
        self._seen, self._poller = 0, None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.stats = {"requests": 0, "chains": 0, "batches": 0, "largest_batch": 0, "score_ms": 0}
        rm = RewardModel.from_pretrained(self.args.reward_model, self.device)
        self._live = _Live(rm, self.args.reward_model, rm.config.version, time.time())
        self._engine, self._search_lock = None, asyncio.Lock()
        if self.args.policy:
            self._engine = search_api.policy_engine(self.args.policy, self.args.policy_engine, self.device,
                                                    self.args.num_gpus)
        self._score_batch.set_max_batch_size(self.args.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def schema_limits(self) -> dict:
        """The limits this replica enforces, for its OpenAPI schema: the settings and the vocabulary size."""
        return {**{n: getattr(self.args, n) for n in LIMIT_NAMES}, "vocab_size": len(self._live.rm.tokenizer)}

    def guard_settings(self) -> tuple[str | None, int]:
        return self.args.token, self.args.max_body_bytes

    def check_health(self) -> None:
        if self._poller is not None and self._poller.done() and not self._poller.cancelled():
            raise RuntimeError(f"the reload poller stopped: {self._poller.exception()!r}")

    # -------------------------------------------------------------------- loading and reloading

    async def _load(self, path: str) -> None:
        rm = await asyncio.to_thread(RewardModel.from_pretrained, path, self.device)
        self._live = _Live(rm, str(path), rm.config.version, time.time())  # one assignment: the swap
        logger.info("reward model %s (version %s) is live", path, rm.config.version)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's ``user_config``; a changed one loads its checkpoint."""
        path = user_config.get("reward_model")
        if set(user_config) != {"reward_model"} or not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError(f"user_config must be {{'reward_model': ABSOLUTE_PATH}}, got {user_config!r}")
        self._ensure_poller()
        async with self._lock:
            if user_config != self._user_config:
                await self._load(user_config["reward_model"])
                self._user_config = dict(user_config)
            path, seq = await self.source.publish_config.remote(user_config["reward_model"])
            if path != self._live.path:  # an admin reload happened before this replica started
                await self._load(path)
            self._seen = seq

    def _ensure_poller(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._follow_source())

    async def _follow_source(self) -> None:
        while True:
            await asyncio.sleep(self.args.poll_s)
            try:
                _, seq = await self.source.get.remote(self.replica_id, self._seen)
                if seq == self._seen:
                    continue
                async with self._lock:
                    path, seq = await self.source.get.remote()
                    if seq > self._seen:
                        await self._load(path)
                    self._seen = seq  # (a lower seq means ModelSource restarted: adopt its count)
            except Exception:  # keep serving the current model; try again next round
                logger.exception("following ModelSource failed")

    # -------------------------------------------------------------------- scoring

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _score_batch(self, chains: list[tuple[str, list[str]]]) -> list[tuple[ChainScore, str]]:
        live = self._live  # the whole batch is scored by one model, whatever reloads meanwhile
        st = self.stats
        st["batches"], st["chains"] = st["batches"] + 1, st["chains"] + len(chains)
        st["largest_batch"] = max(st["largest_batch"], len(chains))
        t = time.monotonic()
        scores = await asyncio.to_thread(live.rm.score, chains, self.args.forward_batch_size)  # length-batched
        st["score_ms"] += round(1000 * (time.monotonic() - t))
        return [(s, live.version) for s in scores]

    def _check(self, prompt: str, steps: list[str], where: str) -> None:
        a = self.args
        if len(steps) > a.max_steps:
            raise _too_large(f"{where} has {len(steps)} steps, over the limit max_steps={a.max_steps}")
        chars = len(prompt) + sum(map(len, steps))
        if chars > a.max_chars:
            raise _too_large(f"{where} has {chars} characters, over the limit max_chars={a.max_chars}")
        # The tokens of the chain layout (data.layout: <s>, prompt, steps, separators, </s>). A token covers at
        # least one byte (plus a possible word-start marker per piece), so short chains skip the tokenizer.
        rm = self._live.rm
        per_sep = len(rm.config.separator.encode()) + 1
        bound = sum(len(x.encode()) + 1 for x in (prompt, *steps)) + (len(steps) + 1) * per_sep + 1
        if bound <= a.max_tokens:
            return
        tokens = chain_length(rm.tokenizer, (prompt, steps), rm.config.separator)
        if tokens > a.max_tokens:
            raise _too_large(f"{where} has {tokens} tokens, over the limit max_tokens={a.max_tokens}")

    def _check_count(self, n: int, what: str) -> None:
        if n > self.args.max_chains:
            raise _too_large(f"{n} {what} in one request, over the limit max_chains={self.args.max_chains}")

    async def _score_all(self, chains: list[tuple[str, list[str]]]) -> list[tuple[ChainScore, str]]:
        self._ensure_poller()
        self.stats["requests"] += 1
        # One batch item per chain, so the chains of a big request join other clients' batches too.
        return list(await asyncio.gather(*(self._score_batch(c) for c in chains)))

    # -------------------------------------------------------------------- routes

    @api.post("/v1/score", response_model=ChainResult | BatchResult, summary="Score every step of chains")
    async def score(self, body: Annotated[ScoreRequest, Body()]) -> Any:
        """One chain ``{prompt, steps}`` (or ``{prompt, text, step_separator}``) -> its step, paragraph and
        task rewards and first error; ``{"items": [chain, ...]}`` -> ``{"items": [result, ...]}``."""
        items = body.items if isinstance(body, BatchIn) else [body]
        self._check_count(len(items), "chains")
        chains = []
        for i, item in enumerate(items):
            where = f"items[{i}]" if isinstance(body, BatchIn) else "the chain"
            chains.append(item_chain(item, self._live.rm.config.separator, where))
            self._check(*chains[-1], where)
        results = [chain_result(s, v, len(c[1])) for (s, v), c in zip(await self._score_all(chains), chains)]
        # Built from plain floats and ints: skip FastAPI's response re-validation (response_model documents it).
        return JSONResponse({"items": results} if isinstance(body, BatchIn) else results[0])

    @api.post("/get_reward", response_model=GetRewardResponse, summary="OpenRLHF remote reward model")
    async def get_reward(self, body: GetRewardRequest) -> dict:
        """``query[i]`` is prompt + response: the response (after ``prompts[i]``, end tokens stripped; start
        tokens too when no prompt is given) is split into steps with the checkpoint's separator; reward = the configured aggregate of the step
        rewards (default ``sum``, the task reward); ``scores`` = ``rewards``."""
        self._check_count(len(body.query), "queries")
        rm = self._live.rm
        chains = query_chains(body, rm.tokenizer, rm.config.separator)
        for i, (prompt, steps) in enumerate(chains):
            self._check(prompt, steps, f"query[{i}]")
        scored = [s for s, _ in await self._score_all(chains)]
        return get_reward_answer(scored, self.args.reward_aggregate, self.args.log_steps)

    async def _vllm(self, request: Request, model: type) -> tuple[Any, list[ChainScore], float, int]:
        """Parse and score a vLLM-shaped request: ``(body, scores, threshold, prompt tokens)``."""
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise vllm_api.VLLMError(f"the body is not valid JSON: {e}") from None
        body = vllm_api.parse(model, raw)
        rm = self._live.rm
        chains = vllm_api.request_chains(body, rm.tokenizer, rm.config.separator, self.args.step_tag)
        self._check_count(len(chains), "inputs")
        for i, chain in enumerate(chains):
            self._check(*chain, f"input[{i}]")
        scored = [s for s, _ in await self._score_all(chains)]
        tokens = sum(chain_length(rm.tokenizer, c, rm.config.separator) for c in chains)
        return body, scored, rm.config.threshold, tokens

    async def _vllm_route(self, request: Request, model: type, respond) -> JSONResponse:
        try:
            return JSONResponse(respond(*await self._vllm(request, model)))
        except vllm_api.VLLMError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except HTTPException as e:  # a limit (413) or a bad chain (422), in vLLM's error shape
            err = vllm_api.VLLMError(str(e.detail), e.status_code, "BadRequestError")
            return JSONResponse(err.body(), status_code=e.status_code)

    @api.post("/pooling", summary="vLLM pooling API (token_classify): [p_wrong, p_right] per step")
    async def pooling(self, request: Request) -> JSONResponse:
        def respond(body, scored, threshold, tokens):
            rows = [vllm_api.step_rows(s.step_rewards, threshold, body.activated()) for s in scored]
            return vllm_api.pooling_response(body.model or self._live.path, rows, tokens)

        return await self._vllm_route(request, vllm_api.PoolingIn, respond)

    @api.post("/classify", summary="vLLM classify API: one score per input (the step scores' aggregate)")
    async def classify(self, request: Request) -> JSONResponse:
        def respond(body, scored, threshold, tokens):
            values = [aggregate(s.step_rewards, self.args.reward_aggregate) for s in scored]
            return vllm_api.classify_response(body.model or self._live.path, values, body.activated(), tokens)

        return await self._vllm_route(request, vllm_api.ClassifyIn, respond)

    @api.post("/v1/search", summary="Reward-guided search: Best-of-N or step-level beam search")
    async def search(self, body: search_api.SearchRequest) -> dict:
        """Sample with the replica's policy, rank by the live reward model's step scores (search_api)."""
        live = self._live
        return await search_api.respond(body, self._engine, live.rm, live.version, self._search_lock, self.args)

    @api.get("/health", response_model=Health, summary="Liveness (open without the token)")
    async def health(self) -> dict:
        self._ensure_poller()
        return {"status": "ok", "version": self._live.version}

    def _info(self) -> dict:
        live, cfg = self._live, self._live.rm.config
        return {
            "path": live.path,
            "version": live.version,
            "max_length": cfg.max_length,
            "separator": cfg.separator,
            "threshold": cfg.threshold,
            "loaded_at": live.loaded_at,
        }

    @api.get("/v1/models", response_model=ModelList, summary="The live checkpoint")
    async def models(self) -> dict:
        proc = psutil.Process()
        cpu = proc.cpu_times()
        return {
            "object": "list",
            "data": [self._info()],
            "replica": self.replica_id,
            "replica_stats": {**self.stats, "rss_bytes": proc.memory_info().rss,
                              "cpu_ms": round(1000 * (cpu.user + cpu.system))},
        }

    @api.post("/admin/reload", response_model=ReloadResult, summary="Load another checkpoint, no downtime")
    async def reload(self, body: ReloadRequest) -> dict:
        """Load ``reward_model`` (an absolute path) here, publish it to the other replicas, and answer once
        they all serve it (or after ``reload_wait_s``; ``replicas_pending`` then says how many lag)."""
        if not os.path.isabs(body.reward_model):
            raise HTTPException(422, "reward_model must be an absolute path (replicas do not share your cwd)")
        root = Path(self.args.reload_root or "/")
        try:
            inside = Path(body.reward_model).resolve().is_relative_to(root)
        except (ValueError, OSError) as e:  # a NUL character, a symlink loop
            raise HTTPException(422, f"reward_model is not a usable path: {e}") from None
        if not inside:
            raise HTTPException(403, f"reward_model must be under this server's reload_root {root} "
                                     "(dense-irl serve --reload-root DIR)")
        async with self._lock:
            try:
                await self._load(body.reward_model)
            except Exception as e:  # anything that does not load is the caller's path's fault
                raise HTTPException(422, f"cannot load reward model {body.reward_model}: {e}") from e
            _, self._seen = await self.source.publish.remote(body.reward_model)
        # Wait (bounded) until the other replicas have polled and loaded it too.
        deadline = time.monotonic() + self.args.reload_wait_s
        while True:
            updated, pending = await self.source.progress.remote(self._seen)
            if pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(self.args.poll_s / 2)
        return {**self._info(), "replicas_updated": updated, "replicas_pending": pending}


# ---------------------------------------------------------------------------- building and running


def app_builder(args: dict | ServeArgs) -> serve.Application:
    """Build the application from ``serve run``/``serve deploy`` args (see :class:`ServeArgs`)."""
    if isinstance(args, dict):
        try:
            args = ServeArgs.model_validate(args)
        except ValidationError as e:  # one line per bad arg, naming it
            bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ConfigError(f"invalid serve args: {bad}") from None
    path = Path(os.path.expanduser(args.reward_model)).resolve()
    check_checkpoint(path)  # a missing or corrupt checkpoint fails here, before any replica starts
    root = Path(os.path.expanduser(args.reload_root or os.getcwd())).resolve()
    args = args.model_copy(
        update={"reward_model": str(path), "token": args.token or os.environ.get(TOKEN_ENV),
                "reload_root": str(root)}
    )
    scorer = RewardScorer.options(
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        user_config={"reward_model": str(path)},
    )
    return scorer.bind(ModelSource.bind(str(path)), args.model_dump())
