"""The published OpenAPI schema, completed with what the server enforces beyond the request models: every
error status a route answers and its body (``{"detail": ...}``, or vLLM's ``{"error": {...}}`` on the
vLLM-shaped routes), and the request bodies of ``/pooling`` and ``/classify`` (parsed by hand there, so that
errors keep vLLM's shape). Framework-free: it edits the dict FastAPI generates."""

from __future__ import annotations

from pydantic import BaseModel

ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
    "description": "what is wrong: a message, or one entry per bad field (loc, msg, type)"}}}
VLLM_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}}
WHY = {400: "the body is not JSON, or (vLLM routes) a field is invalid", 401: "the bearer token is missing or wrong",
       403: "the checkpoint is outside the server's reload_root", 413: "over one of the server's limits",
       422: "a field is invalid", 501: "this server has no policy (start it with --policy)"}
VLLM_ROUTES = ("/pooling", "/classify")


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
