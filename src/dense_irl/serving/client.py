"""``dense-irl score``: a small client of the scoring server (plain functions; cli.py wires them).

dense-irl score --prompt P --step S [--step S ...]        one chain
dense-irl score --prompt P --text T [--step-separator S]  one chain given as one text
dense-irl score --data FILE [--format F] [--out OUT.jsonl] a file of chains (any supported format)
dense-irl score --info                                    the live checkpoint
common: --url http://127.0.0.1:8000 --token T (default: env DENSE_IRL_TOKEN)
"""

from __future__ import annotations

import os

import httpx

from dense_irl.errors import ConfigError, DataError, UserError

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_ENV = "DENSE_IRL_TOKEN"


class ScoreClientError(UserError):
    """The server refused the request (its status and message are in the text) or was unreachable."""


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text[:500]
    if isinstance(detail, list):  # pydantic errors: "body.items.0.steps: List should have ..."
        return "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg', '')}" for e in detail)
    return str(detail)


def request(
    method: str,
    path: str,
    url: str = DEFAULT_URL,
    token: str | None = None,
    body: dict | None = None,
    timeout: float = 60.0,
) -> dict:
    """One JSON request to the server; an error answer or no answer raises :class:`ScoreClientError`."""
    token = token or os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise ScoreClientError(
            f"cannot reach the scoring server at {url} ({type(e).__name__}: {e}); "
            "start one with 'dense-irl serve --reward-model PATH'"
        ) from e
    if response.status_code >= 400:
        raise ScoreClientError(f"{method} {path} -> HTTP {response.status_code}: {_detail(response)}")
    return response.json()


def score_chains(
    chains: list[tuple[str, list[str]]],
    url: str = DEFAULT_URL,
    token: str | None = None,
    batch_size: int = 32,
    timeout: float = 60.0,
) -> list[dict]:
    """Score ``(prompt, steps)`` chains, ``batch_size`` per request; one result dict per chain, in order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    results: list[dict] = []
    for i in range(0, len(chains), batch_size):
        items = [{"prompt": p, "steps": list(s)} for p, s in chains[i : i + batch_size]]
        results += request("POST", "/v1/score", url, token, {"items": items}, timeout)["items"]
    return results


def score_text(
    prompt: str,
    text: str,
    url: str = DEFAULT_URL,
    token: str | None = None,
    step_separator: str | None = None,
    timeout: float = 60.0,
) -> dict:
    """Score one chain given as one text, split by ``step_separator`` (default: the checkpoint's)."""
    body = {"prompt": prompt, "text": text}
    if step_separator is not None:
        body["step_separator"] = step_separator
    return request("POST", "/v1/score", url, token, body, timeout)


def server_info(url: str = DEFAULT_URL, token: str | None = None, timeout: float = 10.0) -> dict:
    """The live checkpoint (``GET /v1/models``)."""
    return request("GET", "/v1/models", url, token, None, timeout)


def publish(reward_model: str, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 120.0) -> dict:
    """Make ``reward_model`` (a checkpoint folder the server can read) the live checkpoint of a running
    ``dense-irl serve`` (``POST /admin/reload``: every replica, no downtime); returns its answer."""
    return request("POST", "/admin/reload", url, token, {"reward_model": str(reward_model)}, timeout)


def score_file(
    path: str,
    out: str | None = None,
    url: str = DEFAULT_URL,
    token: str | None = None,
    fmt: str = "auto",
    step_separator: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Score every chain of a data file; rows ``{id, ...result}`` go to ``out`` (JSONL) when given.

    Returns a summary: chains scored, rows skipped by the reader, mean task reward, model versions.
    """
    from dense_irl.data.readers import load_demonstrations
    from dense_irl.io import write_jsonl

    demos, skipped = load_demonstrations(path, fmt, step_separator)
    if not demos:
        raise DataError(path, None, None, "holds no chains to score")
    results = score_chains([(d.prompt, d.steps) for d in demos], url, token, batch_size)
    rows = [{"id": d.id, **r} for d, r in zip(demos, results)]
    if out:
        write_jsonl(out, rows)
    return {
        "chains": len(rows),
        "skipped": skipped,
        "out": out,
        "mean_task_reward": sum(r["task_reward"] for r in rows) / len(rows),
        "model_versions": sorted({r["model_version"] for r in rows}),
    }


def score_command(
    url: str = DEFAULT_URL,
    token: str | None = None,
    data: str | None = None,
    out: str | None = None,
    fmt: str = "auto",
    prompt: str | None = None,
    steps: list[str] | None = None,
    text: str | None = None,
    step_separator: str | None = None,
    batch_size: int = 32,
    info: bool = False,
) -> dict:
    """What ``dense-irl score`` does with its arguments; returns the JSON to print."""
    if info:
        return server_info(url, token)
    if data is not None:
        if prompt is not None or steps or text is not None:
            raise ConfigError("give either --data FILE or --prompt with --step/--text, not both")
        return score_file(data, out, url, token, fmt, step_separator, batch_size)
    if prompt is None or (not steps) == (text is None):
        raise ConfigError(
            "give --data FILE, or --prompt P with either --step S (repeatable) or --text T, or --info"
        )
    if text is not None:
        return score_text(prompt, text, url, token, step_separator)
    return score_chains([(prompt, steps)], url, token)[0]
