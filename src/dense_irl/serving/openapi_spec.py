"""The published OpenAPI schema, completed with what the server enforces beyond the request models: every
error status a route answers and its body (``{"detail": ...}``, or vLLM's ``{"error": {...}}`` on the
vLLM-shaped routes), and the request bodies of ``/pooling`` and ``/classify`` (parsed by hand there, so that
errors keep vLLM's shape). Framework-free: it edits the dict FastAPI generates."""

from __future__ import annotations

from pydantic import BaseModel

from dense_irl.serving.schemas import VLLM_ROUTES, search_defaults

ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
    "description": "what is wrong: a message, or one entry per bad field (loc, msg, type)"}}}
VLLM_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}}
WHY = {400: "the body is not JSON, or (vLLM routes) a field is invalid", 401: "the bearer token is missing or wrong",
       403: "the checkpoint is outside the server's reload_root", 413: "over one of the server's limits",
       422: "a field is invalid", 501: "this server has no policy (start it with --policy)"}


def _answers(codes: list[int], schema: str) -> dict:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {str(c): {"description": WHY[c], "content": {"application/json": {"schema": ref}}} for c in codes}


def complete_openapi(spec: dict, bodies: dict[str, type[BaseModel]], token: bool) -> dict:
    """``spec`` with every route's error answers and the hand-parsed ``bodies`` (path -> request model).
    ``token``: the server asks for one (401 is then documented)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorAnswer"], schemas["VLLMErrorAnswer"] = ERROR, VLLM_ERROR
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, model in bodies.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
        spec["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {
                "$ref": f"#/components/schemas/{model.__name__}"}}}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path == "/health":
                continue
            codes = [401] if token else []
            if method == "post":
                codes += [400, 413]
                if path not in VLLM_ROUTES:
                    codes.append(422)
            codes += {"/admin/reload": [403], "/v1/search": [501]}.get(path, [])
            op["responses"] = {k: v for k, v in op["responses"].items() if k == "200"}
            op["responses"].update(_answers(sorted(codes), "VLLMErrorAnswer" if path in VLLM_ROUTES else
                                            "ErrorAnswer"))
    return spec


# Rules the server enforces that JSON Schema cannot state (they relate fields, or need the checkpoint's
# tokenizer): published on each operation as ``x-dense-irl-rules`` (id, status, rule) and in its description.
# ``{name}`` is filled from the server's settings.
_CHARS = ("chain-characters", 413, "a chain's prompt and steps hold at most {max_chars} characters together")
_TOKENS = ("chain-tokens", 413, "a chain holds at most {max_tokens} tokens in the checkpoint's layout "
                                "(prompt, separators, steps, end token)")
_BYTES = ("body-bytes", 413, "the body is at most {max_body_bytes} bytes")
RULES: dict[str, list[tuple[str, int, str]]] = {
    "/v1/score": [_BYTES, _CHARS, _TOKENS,
                  ("text-has-a-step", 422, "a 'text' split on its step_separator (default: the checkpoint's "
                                           "separator) leaves at least one non-blank step")],
    "/get_reward": [_BYTES, _CHARS, _TOKENS,
                    ("equal-lengths", 422, "'prompts', 'labels' and 'metas', when given, have as many entries as "
                                           "'query'"),
                    ("query-holds-its-prompt", 422, "query[i] contains prompts[i] (query is prompt + response)")],
    "/pooling": [_BYTES, _CHARS, _TOKENS,
                 ("assistant-after-user", 400, "'messages' has an 'assistant' message after its last 'user' "
                                               "message (the steps scored)")],
    "/classify": [_BYTES, _CHARS, _TOKENS],
    "/v1/search": [_BYTES,
                   ("search-samples", 413, "the chains sampled at once (prompts x n for best_of_n, prompts x "
                                           "beam_width x expand for beam, prompts for greedy) are at most "
                                           "{max_search_samples}"),
                   ("search-tokens", 413, "beam: max_step_tokens x max_steps is at most {max_search_tokens}")],
    "/admin/reload": [_BYTES, ("a-checkpoint", 422, "reward_model is a reward-model checkpoint folder")],
}


def _prop(schemas: dict, model: str, field: str) -> dict:
    """The schema of ``model.field`` without its ``anyOf`` null branch (optional fields)."""
    prop = schemas[model]["properties"][field]
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else prop


def state_limits(spec: dict, limits: dict) -> dict:
    """``spec`` with one server's limits (``ServeArgs``'s ``max_*`` and, in a replica, the checkpoint's ``vocab_size``): as
    JSON Schema keywords where one field decides them (the server checks exactly these), and as
    ``x-dense-irl-rules`` where they relate fields. ``x-dense-irl-limits`` lists the settings."""
    s = spec["components"]["schemas"]
    chains, chars = limits["max_chains"], limits["max_chars"]
    s["BatchIn"]["properties"]["items"]["maxItems"] = chains
    steps = s["ChainIn"]["properties"]["steps"]
    steps["maxItems"], steps["items"]["maxLength"] = limits["max_steps"], chars
    s["ChainIn"]["properties"]["prompt"]["maxLength"] = chars
    for field in ("query", "prompts", "labels", "metas"):
        _prop(s, "GetRewardRequest", field)["maxItems"] = chains
    for model in ("PoolingIn", "ClassifyIn"):
        for branch in _prop(s, model, "input")["anyOf"]:
            if branch.get("type") != "array":
                continue
            inner, vocab = branch["items"], limits.get("vocab_size")
            ids = inner if inner.get("type") == "integer" else inner.get("items", {})
            if vocab and ids.get("type") == "integer":
                ids["maximum"] = vocab - 1
            if inner.get("type") != "integer":  # one entry per chain (not one chain's token ids)
                branch["maxItems"] = chains
    search = s["SearchRequest"]
    search["properties"]["prompt"]["maxLength"] = chars
    search["properties"]["prompts"]["maxItems"] = chains
    search["properties"]["prompts"]["items"]["maxLength"] = chars
    for name, value in search_defaults(limits["max_search_tokens"]).items():
        search["properties"][name]["default"] = value
    samples, tokens = {"maximum": limits["max_search_samples"]}, {"maximum": limits["max_search_tokens"]}
    method = {"required": ["method"], "properties": {"method": {"const": "beam"}}}
    search["allOf"] = [
        {"if": method, "then": {"properties": {"beam_width": samples, "expand": samples, "max_steps": tokens,
                                               "max_step_tokens": tokens}},
         "else": {"properties": {"max_new_tokens": tokens}}},
        {"if": {"not": {"required": ["method"], "properties": {"method": {"enum": ["beam", "greedy"]}}}},
         "then": {"properties": {"n": samples}}},
    ]
    spec["x-dense-irl-limits"] = dict(limits)
    for path, rules in RULES.items():
        op = spec["paths"].get(path, {}).get("post")
        if op is None:
            continue
        stated = [{"id": i, "status": c, "rule": r.format(**limits)} for i, c, r in rules]
        op["x-dense-irl-rules"] = stated
        op["description"] = (op.get("description") or "").rstrip() + "\n\nAlso checked (JSON Schema cannot " \
            "state these):\n" + "\n".join(f"- {x['rule']} (else {x['status']})" for x in stated)
    return spec
