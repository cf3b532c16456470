"""vLLM-shaped scoring: ``POST /pooling`` (``task: token_classify``) and ``POST /classify``, in the request and
response shapes of vLLM's OpenAI-compatible server, so clients written for a vLLM-served process reward
model (a Qwen2.5-Math-PRM-style STEP pooler; verl's reward loop, which calls ``/classify``) work unchanged.

The wire format follows vLLM's ``entrypoints/pooling`` protocol (``PoolingCompletionRequest``,
``PoolingChatRequest``, ``PoolingResponse``, ``ClassificationResponse``, ``ErrorResponse``):

    POST /pooling   {"model", "input": str | [str] | [ids] | [[ids]]} or {"model", "messages": [...]}, "task"
        -> {"id": "pool-..", "object": "list", "created", "model",
            "data": [{"index", "object": "pooling", "data": [[p_wrong, p_right] per step]}], "usage": {..}}
    POST /classify  {"model", "input": str | [str]} -> {"id": "classify-..", "object": "list", "created", "model",
            "data": [{"index", "label": "LABEL_0", "probs": [p], "num_classes": 1}], "usage": {..}}
    errors          {"error": {"message", "type", "param", "code"}} with that HTTP status

A chain's steps are what a PRM client marks: the text before each ``step_tag`` (``<extra_0>`` by default, as
Qwen2.5-Math-PRM) is a step, as vLLM's STEP pooling returns one row per tag; without a tag, the text is split
on the checkpoint's separator. Chat markup (ChatML, Llama 3) is read back into its user prompt and assistant
response. Step row ``[p_wrong, p_right]`` is the softmax of ``[0, z]`` with ``z`` = the step's score minus the
checkpoint's first-error threshold, so ``p_right < 0.5`` exactly where dense-irl calls the step wrong;
``use_activation: false`` returns the logits ``[0, z]``. ``/classify`` gives one value per input: the configured
aggregate of its step scores (``reward_aggregate``), sigmoid-ed unless ``use_activation: false``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from dense_irl.data.layout import split_steps
from dense_irl.serving.schemas import JsonInt, explicit_null, integral, request_config

_FORBID = request_config()
TokenIds = Annotated[list[Annotated[int, Field(ge=0), BeforeValidator(integral)]], Field(min_length=1)]
Input = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
STEP_TAG = "<extra_0>"
# (user turn start, assistant turn start, turn end): ChatML (Qwen2, SmolLM2) and Llama 3.
CHAT_MARKUPS = (
    ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
     "<|eot_id|>"),
)


class VLLMError(Exception):
    """A request error answered in vLLM's error shape."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param = message, status, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: str
    content: str | list[dict] | None = None


class _Common(BaseModel):
    """The fields vLLM's pooling and classify requests share that a scorer can honour or safely accept."""

    model_config = _FORBID

    model: str | None = None
    user: str | None = None
    request_id: str | None = None
    priority: JsonInt = 0
    truncate_prompt_tokens: Annotated[int, Field(ge=-1), BeforeValidator(integral)] | None = None
    use_activation: bool | None = None
    # Older vLLM (0.11) names of use_activation; verl's reward loop sent "activation" for a while.
    activation: bool | None = None
    softmax: bool | None = None
    add_special_tokens: bool | None = None

    def activated(self) -> bool:
        for v in (self.use_activation, self.activation, self.softmax):
            if v is not None:
                return v
        return True


class PoolingIn(_Common):
    """``/pooling``: completion style (``input``) or chat style (``messages``)."""

    model_config = request_config(json_schema_extra={"oneOf": [{"required": ["input"]},
                                                               {"required": ["messages"]}]})

    input: Input | SkipJsonSchema[None] = None
    # (the schema states the roles a chat needs; the order, an assistant after the last user, is a stated rule)
    messages: list[ChatMessage] | SkipJsonSchema[None] = Field(None, json_schema_extra={"allOf": [
        {"contains": {"type": "object", "required": ["role"], "properties": {"role": {"const": role}}}}
        for role in ("user", "assistant")]})
    task: Literal["token_classify"] | None = None
    encoding_format: Literal["float"] = "float"
    dimensions: JsonInt | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> PoolingIn:
        explicit_null(self, ("input", "messages"))
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' (text or token ids) or 'messages' (a chat)")
        return self


class ClassifyIn(_Common):
    """``/classify``: one score per input text."""

    input: Input


def parse(model: type[BaseModel], raw: Any) -> BaseModel:
    """``raw`` JSON as ``model``, or a :class:`VLLMError` naming the first bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["loc"][:1] == ("input",):  # a union: pydantic's message names one of its members
            raise VLLMError("input must be a string, a non-empty list of strings, of token ids (>= 0) or of lists "
                            "of token ids", param="input") from None
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise VLLMError(f"{where}: {err['msg']}", param=where) from None


def _texts(inp, tokenizer) -> list[str]:
    """The input texts: strings as given, token ids decoded (special tokens kept, as a PRM client sends them)."""
    if isinstance(inp, str):
        return [inp]
    if inp and all(isinstance(x, int) for x in inp):
        inp = [inp]
    vocab = len(tokenizer)
    for i, x in enumerate(inp):
        bad = [t for t in x if not 0 <= t < vocab] if not isinstance(x, str) else []
        if bad:  # the tokenizer would fail deep inside (an overflow), or decode nothing meaningful
            raise VLLMError(f"input[{i}]: token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})",
                            param="input")
    return [x if isinstance(x, str) else tokenizer.decode(x, skip_special_tokens=False) for x in inp]


def _content(m: ChatMessage) -> str:
    if isinstance(m.content, list):  # OpenAI content parts: the text parts, in order
        return "".join(p.get("text", "") for p in m.content if p.get("type") == "text")
    return m.content or ""


def chat_turns(text: str) -> tuple[str, str] | None:
    """``(user prompt, assistant response)`` of a chat-templated text, or None if it has no known markup."""
    for user, assistant, end in CHAT_MARKUPS:
        a = text.rfind(assistant)
        if a < 0:
            continue
        u = text.rfind(user, 0, a)
        prompt = text[u + len(user) : a] if u >= 0 else text[:a]  # no user turn start (cut off): all before
        prompt = prompt[: prompt.rfind(end)] if end in prompt else prompt
        response = text[a + len(assistant) :]
        return prompt.strip(), response[: response.find(end)] if end in response else response
    return None


def _steps(response: str, separator: str, step_tag: str) -> list[str]:
    """The steps of a response: the pieces that end in ``step_tag`` (text after the last tag has no row, as
    in vLLM's STEP pooling), else the pieces between separators."""
    if step_tag and step_tag in response:
        return [p.strip() for p in response.split(step_tag)[:-1]]
    return split_steps(response, separator)


def text_chain(text: str, separator: str, step_tag: str = STEP_TAG) -> tuple[str, list[str]]:
    """The chain a completion-style text scores.

    Chat markup: the last user turn is the prompt and the last assistant turn the steps. Plain text with
    step tags: the steps end at the tags, and the first step starts after the first piece's last separator
    (``question\\nStep 1<extra_0>Step 2<extra_0>``). Plain text without tags: ``prompt SEP step SEP ...``, the
    layout dense-irl trains on.
    """
    chat = chat_turns(text)
    if chat is not None:
        return chat[0], _steps(chat[1], separator, step_tag) or [""]
    if step_tag and step_tag in text:
        steps = _steps(text, separator, step_tag)
        head, cut, first = text.split(step_tag)[0].rpartition(separator)
        prompt, steps[0] = (head, first.strip()) if cut else ("", steps[0])
        return prompt.strip(), steps
    pieces = split_steps(text, separator)
    if len(pieces) < 2:
        return "", pieces or [""]
    return pieces[0], pieces[1:]


def messages_chain(messages: list[ChatMessage], separator: str, step_tag: str = STEP_TAG) -> tuple[str, list[str]]:
    """The chain of a chat: the last user message is the prompt, the last assistant message after it the steps."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise VLLMError("messages: no 'user' message to read the prompt from", param="messages")
    after = [m for m in messages[users[-1] + 1 :] if m.role == "assistant"]
    if not after:
        raise VLLMError("messages: no 'assistant' message after the last 'user' message: nothing to score",
                        param="messages")
    return _content(messages[users[-1]]).strip(), _steps(_content(after[-1]), separator, step_tag) or [""]


def request_chains(body: PoolingIn | ClassifyIn, tokenizer, separator: str, step_tag: str) -> list[tuple[str, list[str]]]:
    """Every chain a ``/pooling`` or ``/classify`` request scores, in order."""
    if isinstance(body, PoolingIn) and body.messages is not None:
        return [messages_chain(body.messages, separator, step_tag)]
    texts = _texts(body.input, tokenizer)
    if not texts:
        raise VLLMError("input: empty list", param="input")
    return [text_chain(t, separator, step_tag) for t in texts]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def step_rows(step_scores: list[float], threshold: float, activated: bool) -> list[list[float]]:
    """Per step ``[p_wrong, p_right]`` (the softmax of ``[0, score - threshold]``), or those logits."""
    zs = [s - threshold for s in step_scores]
    return [[1.0 - _sigmoid(z), _sigmoid(z)] if activated else [0.0, z] for z in zs]


def usage(prompt_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
            "prompt_tokens_details": None}


def pooling_response(model: str, rows: list[list[list[float]]], prompt_tokens: int) -> dict:
    """vLLM's ``PoolingResponse``: one ``PoolingResponseData`` per input."""
    return {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "pooling", "data": r} for i, r in enumerate(rows)],
            "usage": usage(prompt_tokens)}


def classify_response(model: str, values: list[float], activated: bool, prompt_tokens: int) -> dict:
    """vLLM's ``ClassificationResponse`` of a one-label model: ``probs`` is ``[sigmoid(value)]`` (or the value)."""
    data = [{"index": i, "label": "LABEL_0", "probs": [_sigmoid(v) if activated else v], "num_classes": 1}
            for i, v in enumerate(values)]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": usage(prompt_tokens)}
