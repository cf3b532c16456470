"""The HTTP contract of the scoring server: request/response models, server settings and limits, and
the framework-free pieces that enforce them (the token/body-size guard, step splitting, result rows).

Every request model forbids unknown fields, so a typo (``step`` for ``steps``) is a 422 naming the field
instead of a silently ignored key. Limits that depend on the server's settings (chains per request,
steps, characters and tokens per chain) are checked by the app after parsing and answered with 413.
"""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic.json_schema import SkipJsonSchema

from dense_irl.models.reward_model import ChainScore

NonEmptyStr = Annotated[str, Field(min_length=1)]
# A character that str.strip() keeps, as a JSON Schema pattern: what "not blank" means to the server. (ECMA's
# \S differs from Python's: it matches \x1c-\x1f and \x85, which strip() removes, and not \ufeff, which it keeps.)
NOT_BLANK = "[^" + "".join(f"\\u{c:04x}" for c in range(0x10000) if chr(c).isspace()) + "]"
_FORBID = ConfigDict(extra="forbid")


def request_config(**extra: Any) -> ConfigDict:
    """A request model's config: unknown fields are errors, and types are strict (a JSON false is not the
    integer 0, nor 0 a boolean: the published schema's types); ``extra`` adds e.g. ``json_schema_extra``."""
    return ConfigDict(extra="forbid", strict=True, **extra)


_REQUEST = request_config()


def integral(value: Any) -> Any:
    """4.0 as the integer 4 (JSON Schema's integers); anything else unchanged, for strict validation."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field of a strict request: 4.0 is the integer 4 (as in JSON Schema), true is not an integer.
JsonInt = Annotated[int, BeforeValidator(integral)]


def explicit_null(model: BaseModel, names: tuple[str, ...]) -> None:
    """An optional field sent as null is an error (leave it out): the published schema does not allow it."""
    for name in names:
        if name in model.model_fields_set and getattr(model, name) is None:
            raise ValueError(f"'{name}' is null: leave it out instead")


class ServeArgs(BaseModel):
    """Arguments of :func:`dense_irl.serving.app.app_builder` (the ``args:`` of serve/config.yaml)."""

    model_config = _FORBID

    reward_model: NonEmptyStr = Field(description="reward model checkpoint folder (save_pretrained layout)")
    token: str | None = Field(None, description="bearer token; default: env DENSE_IRL_TOKEN, else no auth")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; > 0 puts the model on cuda")
    max_batch_size: int = Field(32, ge=1, description="chains gathered per batch (@serve.batch)")
    forward_batch_size: int = Field(
        8, ge=1, description="chains per forward pass inside a batch, sorted by length (GPU: raise it)"
    )
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(256, ge=1, description="per replica; keep >= max_batch_size")
    reward_aggregate: Literal["sum", "min", "last"] = Field(
        "sum", description="/get_reward reward: task reward (sum of steps), worst step, or last step"
    )
    log_steps: int = Field(0, ge=0, le=64, description="/get_reward: also answer the first N step rewards as "
                           "extra_logs step_reward_1..N (OpenRLHF logs each key as one scalar per sample)")
    step_tag: str = Field("<extra_0>", description="/pooling and /classify: the marker after each step (as "
                          "Qwen2.5-Math-PRM's); texts without it split on the checkpoint's separator")
    reload_root: str | None = Field(None, description="/admin/reload loads only checkpoints under this folder "
                                    "(default: the working folder of the process that deploys the app)")
    poll_s: float = Field(1.0, gt=0, description="how often replicas check for an admin reload")
    reload_wait_s: float = Field(60.0, ge=0, description="how long an admin reload waits for all replicas")
    # request limits (each answered with 413 naming the limit)
    max_body_bytes: int = Field(1 << 20, ge=1)
    max_chains: int = Field(64, ge=1, description="chains (or queries) per request")
    max_steps: int = Field(256, ge=1, description="steps per chain")
    max_chars: int = Field(32_000, ge=1, description="characters per chain, prompt included")
    max_tokens: int = Field(8192, ge=1, description="tokens per chain, prompt included")
    # /v1/search (only with a policy)
    policy: str | None = Field(None, description="a policy folder: POST /v1/search samples from it on each replica")
    policy_engine: Literal["hf", "vllm"] = Field("hf", description="/v1/search's sampler: transformers or vLLM")
    max_search_samples: int = Field(64, ge=1, description="/v1/search: chains sampled at once (prompts x n, or "
                                    "prompts x beam_width x expand)")
    max_search_tokens: int = Field(1024, ge=1, description="/v1/search: tokens generated per chain")


LIMIT_NAMES = ("max_body_bytes", "max_chains", "max_steps", "max_chars", "max_tokens", "max_search_samples",
               "max_search_tokens")


def search_defaults(max_search_tokens: int, max_step_tokens: int | None = None,
                    max_steps: int | None = None) -> dict[str, int]:
    """/v1/search's token defaults fitted to the server's ``max_search_tokens``, so that a request leaving
    them out fits: ``max_new_tokens`` 256, ``max_step_tokens`` 64 and ``max_steps`` 16, each lowered to fit
    (beside the request's own ``max_step_tokens`` or ``max_steps`` when it gives one of the two)."""
    step_tokens = max(1, min(64, max_search_tokens // (max_steps or 1)))
    return {"max_new_tokens": min(256, max_search_tokens), "max_step_tokens": step_tokens,
            "max_steps": max(1, min(16, max_search_tokens // (max_step_tokens or step_tokens)))}


class ChainIn(BaseModel):
    """One chain: a prompt and either its steps or one text split by ``step_separator``."""

    # The schema states the rule the validator enforces: exactly one of steps and text (neither may be null).
    model_config = request_config(json_schema_extra={"oneOf": [{"required": ["steps"]}, {"required": ["text"]}],
                                                     "dependentRequired": {"step_separator": ["text"]}})

    prompt: str
    steps: Annotated[list[NonEmptyStr], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None, description="the steps, in order")
    text: str | SkipJsonSchema[None] = Field(None, json_schema_extra={"pattern": NOT_BLANK},
                                             description="the whole solution; split into steps by step_separator")
    step_separator: NonEmptyStr | SkipJsonSchema[None] = Field(None, description="with text: where steps end "
                                                               "(default: the checkpoint's separator)")

    @model_validator(mode="after")
    def _steps_or_text(self) -> ChainIn:
        explicit_null(self, ("steps", "text", "step_separator"))
        if (self.steps is None) == (self.text is None):
            raise ValueError("give exactly one of 'steps' (a list of step strings) or 'text'")
        if self.step_separator is not None and self.text is None:
            raise ValueError("'step_separator' applies only with 'text'")
        return self


class BatchIn(BaseModel):
    """Several chains scored in one request."""

    model_config = _REQUEST

    items: list[ChainIn] = Field(min_length=1)


def _request_kind(value: Any) -> str:
    if isinstance(value, BatchIn) or (isinstance(value, dict) and "items" in value):
        return "batch"
    return "chain"


# One chain, or {"items": [...]}: a callable discriminator keeps the error messages to the shape sent.
ScoreRequest = Annotated[
    Annotated[ChainIn, Tag("chain")] | Annotated[BatchIn, Tag("batch")], Discriminator(_request_kind)
]


class ChainResult(BaseModel):
    """The rewards of one chain."""

    step_rewards: list[float]
    paragraph_rewards: list[float]
    task_reward: float
    first_error: int = Field(description="first step whose reward is below the threshold; -1 when none")
    steps_given: int
    steps_scored: int = Field(description="fewer than steps_given when the chain was cut to max_length")
    truncated: bool
    model_version: str = Field(description="version of the checkpoint that scored this chain")


class BatchResult(BaseModel):
    """The rewards of every chain of a batch request, in order."""

    items: list[ChainResult]


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request: ``query`` is prompt + response."""

    model_config = _REQUEST

    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = Field(None, description="the prompt of each query, stripped off it")
    labels: list[Any] | None = Field(None, description="accepted and ignored (no verifier here)")
    metas: list[Any] | None = Field(None, description="accepted and ignored (newer OpenRLHF sends it)")

    @model_validator(mode="after")
    def _same_lengths(self) -> GetRewardRequest:
        for name in ("prompts", "labels", "metas"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.query):
                raise ValueError(f"'{name}' has {len(value)} entries but 'query' has {len(self.query)}")
        return self


class GetRewardResponse(BaseModel):
    """OpenRLHF's remote reward model answer; ``extra_logs`` holds one list per logged quantity."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class ReloadRequest(BaseModel):
    """Admin: load another checkpoint into every replica."""

    model_config = _REQUEST

    # (the schema states the rule; the route checks it, with a message saying why)
    reward_model: NonEmptyStr = Field(json_schema_extra={"pattern": "^/[^\\u0000]*$"},
                                      description="an absolute path, under the server's reload_root")


class ModelInfo(BaseModel):
    """The checkpoint a replica is serving."""

    id: str = "dense-irl-reward-model"
    object: str = "model"
    path: str
    version: str
    max_length: int
    separator: str
    threshold: float
    loaded_at: float = Field(description="unix time the checkpoint was loaded")


class ReloadResult(ModelInfo):
    """The admin reload's answer: the new checkpoint, and how many replicas serve it yet."""

    replicas_updated: int
    replicas_pending: int = Field(description="replicas still loading when reload_wait_s ran out (else 0)")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelInfo]
    replica: str = Field(description="id of the replica that answered")
    replica_stats: dict[str, int] = Field(
        description="of the replica that answered: requests, chains, batches (forward passes), largest_batch, "
        "score_ms (time in the reward model's forward passes), rss_bytes (its resident memory now), cpu_ms (its "
        "process's CPU time)"
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


# ---------------------------------------------------------------------------- helpers of the app


def aggregate(step_rewards: list[float], how: str) -> float:
    """One scalar per chain for /get_reward: ``sum`` (the task reward), ``min`` or ``last`` step."""
    if not step_rewards:
        return 0.0
    return {"sum": sum, "min": min, "last": lambda r: r[-1]}[how](step_rewards)


def get_reward_answer(scored: list[ChainScore], how: str, log_steps: int = 0) -> dict:
    """OpenRLHF's ``/get_reward`` answer for scored chains: ``rewards`` (the ``how`` aggregate of each chain's
    step rewards), ``scores`` (the same) and per-query ``extra_logs``. With ``log_steps`` N the first N step
    rewards come as ``step_reward_1``..``step_reward_N`` (0.0 past a chain's last scored step; its
    ``steps_scored`` says how many are real): OpenRLHF turns each key into one scalar per sample, so a
    variable-length list cannot pass."""
    rewards = [aggregate(s.step_rewards, how) for s in scored]
    logs = {
        "task_reward": [s.task_reward for s in scored],
        "min_step_reward": [min(s.step_rewards, default=0.0) for s in scored],
        "first_error": [float(s.first_error) for s in scored],
        "steps_scored": [float(s.steps_scored) for s in scored],
    }
    for k in range(log_steps):
        logs[f"step_reward_{k + 1}"] = [s.step_rewards[k] if k < len(s.step_rewards) else 0.0 for s in scored]
    return {"rewards": rewards, "scores": rewards, "extra_logs": logs}


def chain_result(score: ChainScore, version: str, steps_given: int) -> dict:
    """The JSON answer for one scored chain."""
    return {
        "step_rewards": score.step_rewards,
        "paragraph_rewards": score.paragraph_rewards,
        "task_reward": score.task_reward,
        "first_error": score.first_error,
        "steps_given": steps_given,
        "steps_scored": score.steps_scored,
        "truncated": score.steps_scored < steps_given,
        "model_version": version,
    }


# ---------------------------------------------------------------------------- guard middleware

OPEN_PATHS = {"/health", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


# Routes in vLLM's wire format: their errors, the guard's too, come as {"error": {...}} (vllm_api.VLLMError).
VLLM_ROUTES = ("/pooling", "/classify")


async def _send_json(send, status: int, detail: str, headers: list | None = None, vllm: bool = False) -> None:
    kind = "AuthenticationError" if status == 401 else "BadRequestError"
    answer = {"error": {"message": detail, "type": kind, "param": None, "code": status}} if vllm else \
        {"detail": detail}
    body = json.dumps(answer).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: bearer token (401) and body size (413), both before any parsing.

    ``settings()`` returns ``(token or None, max_body_bytes)``; it is asked per request, so the app object
    can be shared while each server (replica) has its own settings.
    """

    def __init__(self, app, settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token, max_body = self.settings()
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        headers = dict(scope.get("headers") or [])
        vllm = path in VLLM_ROUTES
        if token and path not in OPEN_PATHS:
            sent = headers.get(b"authorization", b"")
            if not hmac.compare_digest(sent, b"Bearer " + token.encode()):
                return await _send_json(
                    send,
                    401,
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                    [(b"www-authenticate", b"Bearer")],
                    vllm,
                )
        too_big = f"request body exceeds the limit max_body_bytes={max_body}"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return await _send_json(
                send,
                413 if length.isdigit() else 400,
                too_big if length.isdigit() else "bad Content-Length header",
                vllm=vllm,
            )
        # Read the body ourselves (chunked requests carry no length), then replay it to the app.
        chunks, n = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            n += len(msg.get("body", b""))
            if n > max_body:
                return await _send_json(send, 413, too_big, vllm=vllm)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
