"""The scoring server for real: Ray Serve apps on loopback, deployed from serve/config.yaml, over HTTP.

Two apps share one Serve instance: ``dense-irl`` at / (1 replica, small limits) and ``secure`` at
/secure (2 replicas, a bearer token). Tests that reload checkpoints run last (file order).
"""

import asyncio
import copy
import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel, RewardModelConfig

# Ray's own pydantic models warn about deprecated Field arguments on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
LIMITS = {"max_chains": 4, "max_steps": 24, "max_chars": 2000, "max_tokens": 500, "max_body_bytes": 20_000}
PROMPT = "Sam has 7 marbles. He finds 5 more. Then he loses 3. How many marbles does Sam have now?"
STEPS = ["He finds 5 more: 7 + 5 = 12.", "He loses 3: 12 - 3 = 9.", "The answer is 9."]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny reward models (versions "1" and "2") with random heads, and the models in-process."""
    demos = generate(SyntheticConfig(n_problems=200))
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    policy, tok = load_policy(
        ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), texts
    )
    out, models = {}, {}
    out["policy"] = str(tmp_path_factory.mktemp("policy") / "policy")  # the sampler of /v1/search
    save_policy(policy, tok, out["policy"])
    for version in ("1", "2"):
        rm = RewardModel(policy, tok, RewardModelConfig(version=version, terms="heads"))
        torch.manual_seed(int(version))
        torch.nn.init.normal_(rm.g_head.weight, std=0.5)
        torch.nn.init.normal_(rm.h_head.weight, std=0.5)
        path = tmp_path_factory.mktemp("ckpt") / f"rm{version}"
        rm.save_pretrained(path)
        out[version], models[version] = str(path), RewardModel.from_pretrained(path)
    return out, models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy_config(base: dict, paths: dict, port: int, open_user_config: dict | None = None) -> dict:
    """serve/config.yaml with test args: the open app, and a copy of it with a token and 2 replicas."""
    cfg = copy.deepcopy(base)
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"].update(reward_model=paths["1"], num_cpus=0.5, batch_wait_timeout_s=0.05, log_steps=3,
                       reload_root=str(Path(paths["1"]).parents[1]), **LIMITS)  # the tests' temporary folder
    secure = copy.deepcopy(app)
    app["args"].update(policy=paths["policy"], max_search_samples=8, max_search_tokens=200)  # /v1/search here only
    secure.update(name="secure", route_prefix="/secure")
    secure["args"].update(token=TOKEN, poll_s=0.2, batch_wait_timeout_s=0.005)
    secure["deployments"][0]["num_replicas"] = 2
    if open_user_config:
        app["deployments"][0]["user_config"] = open_user_config
    cfg["applications"].append(secure)
    return cfg


def _deploy(cfg: dict) -> None:
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    # What `serve run serve/config.yaml` / `serve deploy` do: the declarative API, so a user_config
    # change reconfigures running replicas instead of replacing them.
    serve_start(http_options=cfg["http_options"]).deploy_apps(
        ServeDeploySchema.model_validate(cfg), _blocking=True
    )


@pytest.fixture(scope="module")
def server(ray_session, checkpoints):
    from ray import serve

    paths, _ = checkpoints
    base = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = _free_port()
    _deploy(_deploy_config(base, paths, port))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield {"client": client, "url": f"http://127.0.0.1:{port}", "base": base, "port": port}
    serve.shutdown()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _direct(models, version, chains):
    return models[version].score(chains)


# ---------------------------------------------------------------------------- config


def test_config_yaml_parses_and_points_at_the_builder():
    from ray.serve.schema import ServeDeploySchema

    from dense_irl.serving import app as app_mod
    from dense_irl.serving.schemas import ServeArgs

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    assert cfg.http_options.host == "127.0.0.1"
    (app,) = cfg.applications
    module, attr = app.import_path.split(":")
    assert module == app_mod.__name__ and getattr(app_mod, attr) is app_mod.app_builder
    ServeArgs.model_validate(app.args)  # every arg is one the builder knows
    assert app.deployments[0].name == app_mod.RewardScorer.name
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        app_mod.app_builder({**app.args, "reward_model": "/nonexistent/rm"})
    with pytest.raises(ValueError, match="max_chainz"):
        app_mod.app_builder({**app.args, "max_chainz": 3})


# ---------------------------------------------------------------------------- scoring


def test_score_one_chain_text_and_batch(server, checkpoints):
    c = server["client"]
    _, models = checkpoints
    (want,) = _direct(models, "1", [(PROMPT, STEPS)])
    r = c.post("/v1/score", json={"prompt": PROMPT, "steps": STEPS})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["step_rewards"] == pytest.approx(want.step_rewards, abs=1e-4)
    assert len(set(got["step_rewards"])) == 3  # the heads are not zero: real, distinct rewards
    assert got["paragraph_rewards"] == pytest.approx(want.paragraph_rewards, abs=1e-4)
    assert got["task_reward"] == pytest.approx(sum(got["step_rewards"]), abs=1e-4)
    first = next((k for k, x in enumerate(got["step_rewards"]) if x < 0.0), -1)
    assert got["first_error"] == first
    assert (got["steps_given"], got["steps_scored"], got["truncated"], got["model_version"]) == (
        3,
        3,
        False,
        "1",
    )

    as_text = c.post("/v1/score", json={"prompt": PROMPT, "text": " || ".join(STEPS), "step_separator": "||"})
    assert as_text.json()["step_rewards"] == pytest.approx(got["step_rewards"], abs=1e-4)
    default_sep = c.post(
        "/v1/score", json={"prompt": PROMPT, "text": "\n\n".join(STEPS)}
    )  # checkpoint's "\n"
    assert default_sep.json()["step_rewards"] == pytest.approx(got["step_rewards"], abs=1e-4)

    chains = [
        (PROMPT, STEPS),
        ("Mia has 2 coins.", ["She wins 4 more: 2 + 4 = 6.", "The answer is 6."]),
        (PROMPT, STEPS[:1]),
    ]
    r = c.post("/v1/score", json={"items": [{"prompt": p, "steps": s} for p, s in chains]})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    for item, want in zip(items, _direct(models, "1", chains)):
        assert item["step_rewards"] == pytest.approx(want.step_rewards, abs=1e-4)
    assert [i["steps_given"] for i in items] == [3, 2, 1]


def test_long_chain_is_truncated_and_flagged(server):
    steps = [f"He finds {k % 9 + 1} more: {k} + {k % 9 + 1} = {k + k % 9 + 1}." for k in range(10, 32)]
    r = server["client"].post("/v1/score", json={"prompt": PROMPT, "steps": steps})  # > max_length=256 tokens
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["truncated"] and 0 < got["steps_scored"] < got["steps_given"] == len(steps)
    assert len(got["step_rewards"]) == got["steps_scored"]


def test_get_reward_openrlhf_contract(server, checkpoints):
    c = server["client"]
    _, models = checkpoints
    second = ("Mia has 2 coins.", ["She wins 4 more: 2 + 4 = 6.", "The answer is 6."])
    queries = [PROMPT + "\n" + "\n".join(STEPS) + "</s>", "<s>" + second[0] + "\n" + "\n".join(second[1])]
    body = {"query": queries, "prompts": [PROMPT, second[0]], "labels": ["9", "6"]}
    r = c.post("/get_reward", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = _direct(models, "1", [(PROMPT, STEPS), second])
    assert got["rewards"] == pytest.approx([w.task_reward for w in want], abs=1e-4)
    assert got["scores"] == got["rewards"]
    assert got["extra_logs"]["steps_scored"] == [3.0, 2.0]
    assert got["extra_logs"]["min_step_reward"] == pytest.approx(
        [min(w.step_rewards) for w in want], abs=1e-4
    )
    assert set(map(len, got["extra_logs"].values())) == {2}
    # OpenRLHF may send metas; an empty response is still given a (finite) reward.
    r = c.post("/get_reward", json={"query": [PROMPT], "prompts": [PROMPT], "labels": [None], "metas": [{}]})
    assert r.status_code == 200 and r.json()["extra_logs"]["steps_scored"] == [1.0]
    r = c.post("/get_reward", json={"query": ["unrelated text"], "prompts": [PROMPT]})
    assert r.status_code == 422 and "prompts[0]" in r.json()["detail"]


def test_vllm_pooling_and_classify_wire_format(server, checkpoints):
    """The bodies a client of a vLLM-served PRM sends (Qwen2.5-Math-PRM's step tags, chat messages, verl's
    /classify), answered in vLLM's response and error shapes."""
    c = server["client"]
    _, models = checkpoints
    rm = models["1"]
    want = _direct(models, "1", [(PROMPT, STEPS)])[0]
    text = PROMPT + "\n" + "<extra_0>".join(STEPS) + "<extra_0>"
    r = c.post("/pooling", json={"model": "dense-irl", "input": text, "task": "token_classify"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "list" and got["model"] == "dense-irl" and got["id"].startswith("pool-")
    rows = got["data"][0]["data"]
    assert got["data"][0]["object"] == "pooling" and len(rows) == len(STEPS)
    z = [s - rm.config.threshold for s in want.step_rewards]
    assert [row[1] for row in rows] == pytest.approx([1 / (1 + math.exp(-x)) for x in z], abs=1e-4)
    assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
    # Chat style and raw logits give the same steps.
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "\n".join(STEPS)}]
    r = c.post("/pooling", json={"messages": msgs, "use_activation": False})
    assert [row[1] for row in r.json()["data"][0]["data"]] == pytest.approx(z, abs=1e-4)
    # verl's reward loop: POST /classify {model, input, use_activation: false}, reads data[-1].probs[-1].
    r = c.post("/classify", json={"model": "rm", "input": PROMPT + "\n" + "\n".join(STEPS), "use_activation": False})
    assert r.status_code == 200, r.text
    assert r.json()["data"][-1]["probs"][-1] == pytest.approx(want.task_reward, abs=1e-4)
    assert r.json()["data"][0]["num_classes"] == 1 and r.json()["id"].startswith("classify-")
    # Errors in vLLM's shape, naming the problem; the server goes on.
    r = c.post("/pooling", json={"input": "x", "task": "embed"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError" and "task" in r.json()["error"]["message"]
    r = c.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = c.post("/classify", json={"input": [PROMPT + "\nstep"] * 5})
    assert r.status_code == 413 and "max_chains" in r.json()["error"]["message"]
    assert c.get("/health").status_code == 200


def test_openrlhf_client_code_drives_get_reward(server, checkpoints, monkeypatch):
    """OpenRLHF's own remote-RM client (openrlhf.utils.agent, aiohttp): 32 concurrent single-query requests with
    the decoded query as OpenRLHF sends it (chat markers, special tokens), then its reward_func file path."""
    agent = pytest.importorskip("openrlhf.utils.agent", reason="make test installs openrlhf (--no-deps)")

    import dense_irl.integrations.openrlhf_reward as reward_file

    _, models = checkpoints
    tok = models["1"].tokenizer
    prompts = [f"<|im_start|>user\nQuestion {i}: {PROMPT}<|im_end|>\n<|im_start|>assistant\n" for i in range(32)]
    queries = [tok.decode(tok(p + "\n".join(STEPS[: 1 + i % 3]), add_special_tokens=False)["input_ids"]
                          + [tok.eos_token_id], skip_special_tokens=False) for i, p in enumerate(prompts)]
    want = _direct(models, "1", [(p, STEPS[: 1 + i % 3]) for i, p in enumerate(prompts)])

    async def fetch(ex):
        return await asyncio.gather(*(ex._fetch_rewards_via_http([q], [p], ["9"]) for q, p in zip(queries, prompts)))

    got = asyncio.run(fetch(agent.SingleTurnAgentExecutor(remote_rm_url=server["url"] + "/get_reward")))
    assert [g[0]["rewards"][0] for g in got] == pytest.approx([w.task_reward for w in want], abs=1e-4)
    assert [g[0]["extra_logs"]["steps_scored"][0] for g in got] == [float(1 + i % 3) for i in range(32)]
    # --log-steps 3: the first 3 step rewards, one scalar per sample each (0.0 past the chain's last step), as
    # OpenRLHF's samples generator needs them (it makes torch.tensor([value]) of every extra_logs value).
    for g, w in zip(got, want):
        logs = g[0]["extra_logs"]
        assert [logs[f"step_reward_{k}"][0] for k in (1, 2, 3)] == pytest.approx(
            (w.step_rewards + [0.0] * 3)[:3], abs=1e-4)
        assert all(torch.tensor([v]).numel() == 1 for v in logs.values())
    # The Python-function path: OpenRLHF loads our file and calls reward_func, over HTTP and in-process.
    ex = agent.SingleTurnAgentExecutor(remote_rm_url=reward_file.__file__)
    monkeypatch.setenv("DENSE_IRL_URL", server["url"])
    over_http = asyncio.run(ex._fetch_rewards_via_func(queries[:3], prompts[:3], ["9"] * 3))
    monkeypatch.setenv("DENSE_IRL_REWARD_MODEL", checkpoints[0]["1"])
    local = asyncio.run(ex._fetch_rewards_via_func(queries[:3], prompts[:3], ["9"] * 3))
    for a, b, w in zip(over_http, local, want):
        assert a["rewards"][0] == pytest.approx(w.task_reward, abs=1e-4)
        assert b["rewards"][0] == pytest.approx(w.task_reward, abs=1e-4)
    monkeypatch.setenv("DENSE_IRL_LOG_STEPS", "2")
    logs = asyncio.run(ex._fetch_rewards_via_func(queries[:1], prompts[:1], ["9"]))[0]["extra_logs"]
    assert logs["step_reward_1"] == pytest.approx(want[0].step_rewards[:1], abs=1e-4) and "step_reward_3" not in logs


def test_verl_reward_manager_over_http(server, checkpoints):
    """verl's reward manager asking the live app (/v1/score) gives the in-process manager's token rewards."""
    pytest.importorskip("verl", reason="make test installs verl (--no-deps)")
    from verl import DataProto

    from dense_irl.integrations.verl import DenseIRLRewardManager

    paths, models = checkpoints
    tok = models["1"].tokenizer
    p = tok(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    r = tok("\n".join(STEPS), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    data = DataProto.from_dict(tensors={"prompts": torch.tensor([p]), "responses": torch.tensor([r]),
                                        "attention_mask": torch.ones(1, len(p) + len(r), dtype=torch.long)})
    remote = DenseIRLRewardManager(tok, 0, None, url=server["url"])(data)
    local = DenseIRLRewardManager(tok, 0, None, reward_model=paths["1"])(data)
    assert remote.shape == (1, len(r)) and torch.allclose(remote, local, atol=1e-4)
    assert remote.sum().item() == pytest.approx(_direct(models, "1", [(PROMPT, STEPS)])[0].task_reward, abs=1e-3)
    # verl 0.9's reward loop: one score per rollout, the chain's return, asked of the live app.
    from omegaconf import OmegaConf

    from dense_irl.integrations.verl import DenseIRLRewardLoopManager

    loop_manager = DenseIRLRewardLoopManager(OmegaConf.create({"reward": {"reward_kwargs": {"url": server["url"]}}}),
                                             tok)
    answer = asyncio.run(loop_manager.run_single(data))
    assert answer["reward_score"] == pytest.approx(remote.sum().item(), abs=1e-3)
    assert answer["reward_extra_info"]["dense_irl_steps"] == len(STEPS)


def test_concurrent_requests_are_batched(server):
    c, n = server["client"], 12
    before = c.get("/v1/models").json()["replica_stats"]
    barrier, statuses = threading.Barrier(n), []

    def one(i):
        with httpx.Client(base_url=server["url"], timeout=60) as cl:
            barrier.wait()
            r = cl.post("/v1/score", json={"prompt": PROMPT, "steps": STEPS[: i % 3 + 1]})
            statuses.append((r.status_code, r.json()["steps_scored"] == i % 3 + 1))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert statuses == [(200, True)] * n
    after = c.get("/v1/models").json()["replica_stats"]
    assert after["chains"] - before["chains"] == n
    assert after["batches"] - before["batches"] < n  # several chains shared a forward pass
    assert after["largest_batch"] >= 2
    assert after["rss_bytes"] > 50e6  # the replica's resident memory: at least the model and torch
    assert after["score_ms"] > 0 and after["cpu_ms"] > 1000  # forward time; CPU time with the imports and load


def test_search_endpoint_best_of_n_and_beam(server):
    c = server["client"]
    r = c.post("/v1/search", json={"prompt": PROMPT, "n": 3, "max_new_tokens": 24, "aggregation": "mean"})
    assert r.status_code == 200, r.text
    body = r.json()
    (res,) = body["results"]
    assert body["method"] == "best_of_n" and body["version"] == "1" and len(res["candidates"]) == 3
    assert 0 < res["tokens_generated"] <= 3 * 24 and res["completion"] == "\n".join(res["steps"])
    scored = [cand["score"] for cand in res["candidates"] if cand["score"] is not None
              and cand["finished"] == res["finished"]]
    assert res["score"] == max(scored)
    r = c.post("/v1/search", json={"prompts": [PROMPT, "Mia has 3 apples. How many apples does Mia have?"],
                                   "method": "beam", "beam_width": 2, "expand": 2, "max_steps": 3,
                                   "max_step_tokens": 12, "seed": 3})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert len(res["candidates"]) <= 2 and len(res["steps"]) <= 3
        assert len(res["step_scores"]) == len(res["steps"])
    # Left-out token fields fit this server's max_search_tokens (200; the built-in defaults would not).
    r = c.post("/v1/search", json={"prompt": PROMPT, "method": "beam", "max_step_tokens": 50, "beam_width": 1,
                                   "expand": 1})
    assert r.status_code == 200, r.text
    assert (r.json()["config"]["max_step_tokens"], r.json()["config"]["max_steps"]) == (50, 4)
    # A server without a policy says how to get one.
    r = c.post("/secure/v1/search", json={"prompt": PROMPT, "max_new_tokens": 24}, headers=AUTH)
    assert r.status_code == 501 and "--policy" in r.json()["detail"]


# ---------------------------------------------------------------------------- bad input


def _chain(**kw):
    return {"prompt": PROMPT, "steps": STEPS, **kw}


digits = " ".join("1234567890" * 3)  # every digit is a token: ~60 tokens in 60 characters
BAD = [
    ("malformed JSON", "/v1/score", b'{"prompt": "x", "steps": [', 422, "JSON"),
    ("not an object", "/v1/score", [1, 2], 422, "dictionary"),
    ("prompt not a string", "/v1/score", {"prompt": 3, "steps": ["a"]}, 422, "string"),
    ("steps not a list", "/v1/score", {"prompt": "x", "steps": "a"}, 422, "list"),
    ("step not a string", "/v1/score", {"prompt": "x", "steps": ["a", 2]}, 422, "string"),
    ("empty steps", "/v1/score", {"prompt": "x", "steps": []}, 422, "at least 1"),
    ("empty step", "/v1/score", {"prompt": "x", "steps": ["a", ""]}, 422, "at least 1"),
    ("unknown field", "/v1/score", _chain(stepz=["a"]), 422, "stepz"),
    ("unknown field in item", "/v1/score", {"items": [_chain(extra=1)]}, 422, "extra"),
    ("steps and text", "/v1/score", _chain(text="a"), 422, "exactly one"),
    ("neither steps nor text", "/v1/score", {"prompt": "x"}, 422, "exactly one"),
    ("separator without text", "/v1/score", _chain(step_separator="|"), 422, "step_separator"),
    ("text without steps", "/v1/score", {"prompt": "x", "text": "\n \n"}, 422, "no non-empty step"),
    ("empty batch", "/v1/score", {"items": []}, 422, "at least 1"),
    ("too many chains", "/v1/score", {"items": [_chain()] * 5}, 413, "max_chains=4"),
    ("too many steps", "/v1/score", _chain(steps=["a"] * 25), 413, "max_steps=24"),
    ("too many characters", "/v1/score", _chain(steps=["x" * 1000] * 3), 413, "max_chars=2000"),
    ("too many tokens", "/v1/score", _chain(steps=[digits] * 10), 413, "max_tokens=500"),
    ("too many queries", "/get_reward", {"query": ["a"] * 5}, 413, "max_chains=4"),
    ("query not a list", "/get_reward", {"query": "a"}, 422, "list"),
    ("lengths differ", "/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 422, "'prompts' has 1"),
    ("unknown get_reward field", "/get_reward", {"query": ["a"], "responses": ["b"]}, 422, "responses"),
    ("search: prompt and prompts", "/v1/search", {"prompt": "a", "prompts": ["b"]}, 422, "exactly one"),
    ("search: seed out of range", "/v1/search", {"prompt": "a", "seed": 2**64}, 422, "seed"),
    ("search: unknown method", "/v1/search", {"prompt": "a", "method": "mcts"}, 422, "best_of_n"),
    ("search: greedy temperature", "/v1/search", {"prompt": "a", "temperature": 0}, 422, "search.temperature"),
    ("search: too many samples", "/v1/search", {"prompts": ["a", "b", "c"], "n": 4}, 413, "max_search_samples=8"),
    ("search: too many tokens", "/v1/search", {"prompt": "a", "method": "beam", "max_step_tokens": 50,
                                                       "max_steps": 16}, 413,
     "max_step_tokens x max_steps), over the limit max_search_tokens=200"),
    ("search: too many tokens (best_of_n)", "/v1/search", {"prompt": "a", "max_new_tokens": 300}, 413, "(max_new_tokens), over the limit"),
    ("relative reload path", "/admin/reload", {"reward_model": "runs/rm"}, 422, "absolute"),
    ("reload outside reload_root", "/admin/reload", {"reward_model": "/etc/../nonexistent/rm"}, 403, "reload_root"),
]


@pytest.mark.parametrize("name,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_naming_the_problem(server, name, path, body, status, words):
    c = server["client"]
    if isinstance(body, bytes):
        r = c.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert words in r.text


def test_body_size_limit_with_and_without_content_length(server):
    c, big = server["client"], b'{"prompt": "' + b"x" * 30_000 + b'", "steps": ["a"]}'
    r = c.post("/v1/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=20000" in r.json()["detail"]
    chunked = c.post(
        "/v1/score",
        content=iter([big[:10_000], big[10_000:]]),  # no Content-Length
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["detail"]
    assert c.get("/v1/score").status_code == 405


def test_slow_bodies_hold_no_one_up(server):
    """Slowloris: 16 connections send their bodies a byte at a time and stay open; meanwhile every other client
    is answered at once, and each slow request gets its own answer when its body is complete."""
    c, body = server["client"], json.dumps(_chain()).encode()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    slow = [socket.create_connection(("127.0.0.1", server["port"]), timeout=60) for _ in range(16)]
    try:
        for s in slow:
            s.sendall(head + body[:5])
        for i in range(5, 10):
            for s in slow:
                s.sendall(body[i : i + 1])
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            assert c.post("/v1/score", json=_chain()).status_code == 200
            assert time.monotonic() - t0 < 10
            time.sleep(0.2)
        for s in slow:
            s.sendall(body[10:])
        for s in slow:
            assert s.recv(64).startswith(b"HTTP/1.1 200"), "a slow body's request was not answered"
    finally:
        for s in slow:
            s.close()
    assert c.get("/health").status_code == 200


def _follow_stated_rules(path: str, body, schema_raw: dict, tokenizer, separator: str):
    """A schema-valid ``body`` made to follow the rules the live schema states beyond JSON Schema
    (``x-dense-irl-rules``), or None where only a smaller body would (the size limits). Every id it knows is in
    FOLLOWED; the test checks that the schema states exactly those."""
    from dense_irl.data.layout import chain_length, split_steps
    from dense_irl.serving import vllm_api
    from dense_irl.serving.requests import item_chain, query_chains
    from dense_irl.serving.schemas import ChainIn, GetRewardRequest

    lim = schema_raw["x-dense-irl-limits"]
    body = copy.deepcopy(body)
    chains = []
    if path == "/v1/score":
        for item in body.get("items", [body]):
            if "text" in item and not split_steps(item["text"], item.get("step_separator", separator)):
                item["text"] += "x"  # text-has-a-step
        parse = lambda: [item_chain(ChainIn.model_validate(i), separator) for i in body.get("items", [body])]  # noqa: E731
    elif path == "/get_reward":
        n = len(body["query"])
        for name, pad in (("prompts", ""), ("labels", None), ("metas", None)):  # equal-lengths
            if body.get(name) is not None:
                body[name] = (body[name] + [pad] * n)[:n]
        for i, prompt in enumerate(body.get("prompts") or []):  # query-holds-its-prompt
            if prompt not in body["query"][i]:
                body["query"][i] = prompt + body["query"][i]
        parse = lambda: query_chains(GetRewardRequest.model_validate(body), tokenizer, separator)  # noqa: E731
    elif path in ("/pooling", "/classify"):
        msgs = body.get("messages")
        if msgs is not None:  # assistant-after-user
            last_user = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
            if not any(m.get("role") == "assistant" for m in msgs[last_user:]):
                msgs.append({"role": "assistant", "content": "x"})
        model = vllm_api.PoolingIn if path == "/pooling" else vllm_api.ClassifyIn
        parse = lambda: vllm_api.request_chains(vllm_api.parse(model, body), tokenizer, separator, "<extra_0>")  # noqa: E731
    elif path == "/v1/search":
        prompts = len(body.get("prompts") or [0])
        samples, method = lim["max_search_samples"], body.get("method", "best_of_n")
        if method == "best_of_n":  # search-samples
            body["n"] = min(body.get("n", 4), samples // prompts)
        elif method == "beam":
            body["beam_width"] = min(body.get("beam_width", 2), samples // prompts)
            body["expand"] = min(body.get("expand", 2), samples // (prompts * body["beam_width"]))
            if "max_step_tokens" in body and "max_steps" in body:  # search-tokens
                body["max_steps"] = max(1, min(body["max_steps"], lim["max_search_tokens"] // body["max_step_tokens"]))
        parse = list
    else:  # /admin/reload: a generated path is no checkpoint under reload_root (a-checkpoint): 403, which
        parse = list  # the positive check takes as a refusal of this caller
    try:
        chains = parse()
    except Exception:  # the server must take it: let it answer (and the checks judge that answer)
        chains = []
    for prompt, steps in chains:  # chain-characters, chain-tokens
        if len(prompt) + sum(map(len, steps)) > lim["max_chars"] or \
                chain_length(tokenizer, (prompt, steps), separator) > lim["max_tokens"]:
            return None
    if len(json.dumps(body).encode()) > lim["max_body_bytes"]:  # body-bytes
        return None
    return body


FOLLOWED = {"text-has-a-step", "equal-lengths", "query-holds-its-prompt", "assistant-after-user",
            "search-samples", "search-tokens", "a-checkpoint", "chain-characters", "chain-tokens", "body-bytes"}


def test_schema_generated_requests_never_fail_the_server(server, checkpoints):
    """schemathesis: requests generated from each live OpenAPI schema (valid and invalid bodies, headers and
    query strings) to the open app, and to the token app with and without its token, judged by every
    schemathesis check: no 5xx, answers as documented (status, headers, body schema), every schema-valid
    request accepted (made to follow the rules the schema states in words) and every invalid one refused;
    no stack trace or file path in an answer, and /health answers throughout. `make fuzz` runs more cases."""
    schemathesis = pytest.importorskip("schemathesis", reason="make test installs schemathesis")
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    rm = checkpoints[1]["1"]
    calls = []
    examples = settings(max_examples=int(os.environ.get("DENSE_IRL_FUZZ_EXAMPLES", "8")), deadline=None,
                        suppress_health_check=list(HealthCheck), database=None)
    runs = [(server["url"], {}), (server["url"] + "/secure", {}), (server["url"] + "/secure", AUTH)]

    def checker(base: str, headers: dict, raw: dict):
        def check(case):
            positive = case.meta.generation.mode is GenerationMode.POSITIVE
            if positive and case.method.lower() == "post":
                case.body = _follow_stated_rules(case.path, case.body, raw, rm.tokenizer, rm.config.separator)
                assume(case.body is not None)
            r = case.call_and_validate(base_url=base, headers=headers, timeout=60)
            calls.append(r.status_code)
            assert not any(leak in r.text for leak in ("Traceback", "site-packages", '.py"', 'File "')), r.text
        return check

    for base, headers in runs:
        raw = server["client"].get(base + "/openapi.json").json()
        stated = {r["id"] for op in raw["paths"].values() for m in op.values() for r in m.get("x-dense-irl-rules", [])}
        assert stated == FOLLOWED, stated ^ FOLLOWED
        schema = schemathesis.openapi.from_dict(raw)
        # A request over a stated limit is refused with 413 (documented on every POST).
        schema.config.checks.negative_data_rejection.expected_statuses = ["400", "401", "403", "413", "422"]

        operations = [result.ok() for result in schema.get_all_operations()]
        for op in operations:
            if headers and op.path == "/v1/search":
                continue  # the token app has no policy: the documented 501 (test_search_endpoint_best_of_n_and_beam)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    examples(given(case=op.as_strategy(mode))(checker(base, headers, raw)))()
                except Unsatisfiable:  # nothing invalid to send (GET /health takes no input)
                    assert mode is GenerationMode.NEGATIVE
        assert len(operations) >= 8 and server["client"].get("/health").status_code == 200
    print({"schemathesis_runs": len(runs), "requests": len(calls),
           "statuses": {c: calls.count(c) for c in sorted(set(calls))}})


# Hand-made hostile bodies, each under the test app's max_body_bytes (20 kB) so that the parser meets them.
HOSTILE = [
    ("deeply nested JSON", "/v1/score", b'{"prompt": "a", "steps": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422),
    ("NaN and Infinity", "/v1/search", b'{"prompt": "a", "temperature": NaN, "top_p": Infinity}', 422),
    ("a huge integer", "/v1/search", b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", 422),
    ("invalid UTF-8", "/v1/score", b'{"prompt": "\xff\xfe", "steps": ["a"]}', 422),
    ("raw invalid UTF-8 bytes", "/get_reward", b'{"query": ["\xc3\x28"]}', 422),
    ("unicode separators", "/v1/score",
     json.dumps({"prompt": "a", "text": "x\u2028y\u2029z\u0085w", "step_separator": "\u2028"}).encode(), 200),
    ("15000 empty steps", "/v1/score", json.dumps({"prompt": "a", "text": "\n" * 15_000}).encode(), 422),
    ("4000 empty pooling steps", "/pooling", json.dumps({"model": "m", "input": "<extra_0>" * 2000}).encode(), 400),
    ("a string where a chain is", "/v1/score", b'{"items": ["not a chain"]}', 422),
    ("null body", "/classify", b"null", 400),
    ("token ids outside the vocabulary", "/pooling", b'{"model": "m", "input": [[1000000000000, -1]]}', 400),
    ("a NUL in a reload path", "/admin/reload", json.dumps({"reward_model": "/tmp/a\u0000b"}).encode(), 422),
    ("a denormal temperature", "/v1/search", b'{"prompt": "a", "temperature": 5e-324, "max_new_tokens": 4}', 200),
]


@pytest.mark.parametrize("name,path,body,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_answered_without_internals(server, name, path, body, status):
    r = server["client"].post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code // 100 == status // 100, (r.status_code, r.text[:300])
    assert not any(leak in r.text for leak in ("Traceback", "site-packages", '.py"')), r.text[:300]
    assert server["client"].get("/health").status_code == 200


def test_server_keeps_serving_after_bad_input(server):
    c = server["client"]
    assert c.get("/health").json() == {"status": "ok", "version": "1"}
    assert c.post("/v1/score", json=_chain()).status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/get_reward", "/health", "/v1/models", "/admin/reload"} <= set(paths)


def test_live_schema_states_this_servers_limits(server, checkpoints):
    """Each app's /openapi.json carries its own replica's limits as JSON Schema keywords, the rules JSON
    Schema cannot state as x-dense-irl-rules, and only JSON Schema keywords (no pydantic 'ge')."""
    c, vocab = server["client"], len(checkpoints[1]["1"].tokenizer)

    def keys(node):
        if isinstance(node, dict):
            yield from node
            for v in node.values():
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    for prefix, search_samples in (("", 8), ("/secure", 64)):
        spec = c.get(prefix + "/openapi.json").json()
        s = spec["components"]["schemas"]
        assert not {"ge", "gt", "le", "lt"} & set(keys(spec))
        assert s["BatchIn"]["properties"]["items"]["maxItems"] == LIMITS["max_chains"]
        assert s["ChainIn"]["properties"]["steps"]["maxItems"] == LIMITS["max_steps"]
        assert s["ChainIn"]["dependentRequired"] == {"step_separator": ["text"]}
        ids = s["PoolingIn"]["properties"]["input"]["anyOf"][2]["items"]
        assert ids == {"type": "integer", "minimum": 0, "maximum": vocab - 1}
        assert spec["x-dense-irl-limits"]["max_search_samples"] == search_samples
        rules = {r["id"]: r for r in spec["paths"]["/v1/score"]["post"]["x-dense-irl-rules"]}
        assert f"at most {LIMITS['max_tokens']} tokens" in rules["chain-tokens"]["rule"]
        assert "else 413" in spec["paths"]["/v1/score"]["post"]["description"]
    # /v1/search's token defaults are fitted to the open app's max_search_tokens (200).
    props = c.get("/openapi.json").json()["components"]["schemas"]["SearchRequest"]["properties"]
    assert (props["max_new_tokens"]["default"], props["max_step_tokens"]["default"], props["max_steps"]["default"]) \
        == (200, 64, 3)


# ---------------------------------------------------------------------------- auth and client


def test_bearer_token(server):
    c = server["client"]
    assert c.get("/secure/health").status_code == 200  # open for liveness probes
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = c.post("/secure/v1/score", json=_chain(), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    # The token is checked before the body is even parsed.
    r = c.post("/secure/v1/score", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert c.post("/secure/admin/reload", json={"reward_model": "/x"}).status_code == 401
    assert c.get("/secure/v1/models").status_code == 401
    r = c.post("/secure/v1/score", json=_chain(), headers=AUTH)
    assert r.status_code == 200 and r.json()["model_version"] == "1"


def test_client_functions(server, tmp_path, monkeypatch):
    from dense_irl.io import write_jsonl
    from dense_irl.serving import client

    url = server["url"]
    (one,) = client.score_chains([(PROMPT, STEPS)], url)
    assert one["steps_scored"] == 3
    assert client.score_text(PROMPT, "\n".join(STEPS), url)["step_rewards"] == one["step_rewards"]
    assert client.server_info(url)["data"][0]["version"] == "1"
    monkeypatch.setenv(client.TOKEN_ENV, TOKEN)  # the token comes from the environment
    assert (
        client.score_command(url + "/secure", prompt=PROMPT, steps=STEPS)["step_rewards"]
        == one["step_rewards"]
    )
    monkeypatch.delenv(client.TOKEN_ENV)
    with pytest.raises(client.ScoreClientError, match="HTTP 401"):
        client.score_chains([(PROMPT, STEPS)], url + "/secure")
    with pytest.raises(client.ScoreClientError, match="HTTP 413: .*max_steps=24"):
        client.score_chains([(PROMPT, ["a"] * 30)], url)
    with pytest.raises(client.ScoreClientError, match="cannot reach"):
        client.server_info(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ValueError, match="--data FILE"):
        client.score_command(url, prompt=PROMPT)

    data = tmp_path / "chains.jsonl"
    write_jsonl(data, [{"id": f"c{i}", "prompt": PROMPT, "steps": STEPS[: i + 1]} for i in range(3)])
    summary = client.score_command(
        url, data=str(data), out=str(tmp_path / "scores.jsonl"), fmt="plain", batch_size=2
    )
    assert summary["chains"] == 3 and summary["model_versions"] == ["1"]
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [(r["id"], r["steps_scored"]) for r in rows] == [("c0", 1), ("c1", 2), ("c2", 3)]


# ---------------------------------------------------------------------------- reloads (last: they change the version)


class Traffic:
    """Clients scoring continuously in threads; records every (status, version)."""

    def __init__(self, url: str, path: str, headers: dict, n: int = 4):
        self.url, self.path, self.headers, self.stop = url, path, headers, threading.Event()
        self.seen: list[list[tuple[int, str]]] = [[] for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60, headers=self.headers) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.path, json=_chain())
                    self.seen[i].append((r.status_code, r.json().get("model_version", r.text)))
                except httpx.HTTPError as e:
                    self.seen[i].append((0, repr(e)))

    def __enter__(self):
        [t.start() for t in self.threads]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        [t.join() for t in self.threads]

    def wait_for(self, version: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s and s[-1][1] == version for s in self.seen):
                return
            time.sleep(0.1)
        raise AssertionError(f"version {version} not served within {timeout}s: {[s[-3:] for s in self.seen]}")

    def check(self, monotone: bool) -> None:
        """Every request succeeded; with ``monotone``, no client saw the old version after the new one."""
        for s in self.seen:
            assert s and all(status == 200 for status, _ in s), [x for x in s if x[0] != 200][:3]
            versions = [v for _, v in s]
            assert not monotone or versions == sorted(versions), "a client saw the old version after the new"


def test_reload_by_user_config_while_requests_flow(server, checkpoints):
    paths, _ = checkpoints
    cfg = _deploy_config(server["base"], paths, server["port"], open_user_config={"reward_model": paths["2"]})
    replica = server["client"].get("/v1/models").json()["replica"]
    with Traffic(server["url"], "/v1/score", {}) as traffic:
        time.sleep(0.5)
        _deploy(cfg)  # what `serve deploy` with a new user_config does
        traffic.wait_for("2")
    traffic.check(monotone=True)  # one replica: the swap is a single assignment
    assert {v for s in traffic.seen for _, v in s} == {"1", "2"}
    got = server["client"].get("/v1/models").json()
    assert (got["data"][0]["version"], got["data"][0]["path"]) == ("2", paths["2"])
    assert got["replica"] == replica  # the running replica loaded it (reconfigure), nothing restarted


def test_admin_reload_reaches_every_replica_while_requests_flow(server, checkpoints):
    paths, _ = checkpoints
    c = server["client"]
    with Traffic(server["url"], "/secure/v1/score", AUTH) as traffic:
        time.sleep(0.5)
        r = c.post("/secure/admin/reload", json={"reward_model": paths["2"]}, headers=AUTH)
        assert r.status_code == 200, r.text
        got = r.json()
        # It answers once both replicas serve the new checkpoint: from then on, nobody sees "1".
        assert (got["version"], got["replicas_updated"], got["replicas_pending"]) == ("2", 2, 0)
        marks = [len(s) for s in traffic.seen]
        traffic.wait_for("2")
        time.sleep(0.5)
    traffic.check(monotone=False)  # two replicas: until the answer, one may still serve "1"
    after = [v for s, mark in zip(traffic.seen, marks) for _, v in s[mark + 1 :]]  # +1: one was in flight
    assert after and set(after) == {"2"}
    replicas = {}
    for _ in range(400):  # both replicas answer, both with the new checkpoint (the router may favour one)
        got = c.get("/secure/v1/models", headers=AUTH).json()
        replicas[got["replica"]] = got["data"][0]["version"]
        if len(replicas) == 2:
            break
    assert len(replicas) == 2 and set(replicas.values()) == {"2"}
    bad = c.post("/secure/admin/reload", json={"reward_model": paths["1"] + "-missing"}, headers=AUTH)
    assert bad.status_code == 422 and "not found" in bad.json()["detail"]
    # A truncated checkpoint: the answer names the file, and the old model keeps serving.
    corrupt = Path(paths["1"]).parent / "rm1-truncated"
    shutil.copytree(paths["1"], corrupt)
    heads = corrupt / "reward_head.safetensors"
    heads.write_bytes(heads.read_bytes()[:40])
    bad = c.post("/secure/admin/reload", json={"reward_model": str(corrupt)}, headers=AUTH)
    assert bad.status_code == 422 and f"{heads} is not a readable safetensors file" in bad.json()["detail"]
    assert c.get("/secure/health").json()["version"] == "2"
    assert c.post("/secure/v1/score", json=_chain(), headers=AUTH).status_code == 200


def test_live_publishing_from_training(server, checkpoints):
    """What the loop does after each checkpoint with serve.publish_url (Driver.publish): two versions go live
    while clients keep scoring, none failing; an unreachable server is logged, never fatal to training."""
    from types import SimpleNamespace

    from dense_irl.runtime.driver import Driver
    from dense_irl.runtime.loop_config import LoopConfig, PublishConfig

    paths, _ = checkpoints
    rows: list[dict] = []
    drv = SimpleNamespace(cfg=LoopConfig(serve=PublishConfig(publish_url=server["url"] + "/secure", token=TOKEN)),
                          log=rows.append)  # the two attributes Driver.publish reads
    with Traffic(server["url"], "/secure/v1/score", AUTH) as traffic:
        time.sleep(0.5)
        for version in ("1", "2"):
            Driver.publish(drv, Path(paths[version]))
            traffic.wait_for(version)
        time.sleep(0.3)
    traffic.check(monotone=False)  # every request answered 200 throughout
    assert [(r["event"], r["version"], r["replicas_updated"]) for r in rows] == [("published", "1", 2),
                                                                                 ("published", "2", 2)]
    drv.cfg = LoopConfig(serve=PublishConfig(publish_url="http://127.0.0.1:9", timeout_s=2))
    Driver.publish(drv, Path(paths["1"]))
    assert rows[-1]["event"] == "publish_failed" and "cannot reach the scoring server" in rows[-1]["error"]
    assert server["client"].get("/secure/health", headers=AUTH).json()["version"] == "2"


def test_soak_short_form(server, checkpoints):
    """bench/soak.py's loop for a few seconds on the 2-replica app: clients keep scoring while admin reloads
    swap two checkpoints; not one request fails. (`python bench/soak.py` runs 32 clients for 10 minutes.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak_bench", ROOT / "bench" / "soak.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths, _ = checkpoints
    res = bench.soak(server["url"] + "/secure", [(PROMPT, STEPS), (PROMPT, STEPS[:1])], clients=6, seconds=12,
                     reload_every=3.5, reload_paths=[paths["1"], paths["2"]], headers=AUTH, window_s=4)
    assert res["requests"] > 20 and res["failed"] == 0, res
    assert [r["version"] for r in res["reloads"]][:2] == ["1", "2"]


def test_cli_score_and_serve_errors(server, checkpoints, tmp_path, capsys):
    """`dense-irl score` talks to the running app; `dense-irl serve` names a missing checkpoint."""
    from dense_irl.cli import main

    assert main(["score", "--url", server["url"], "--prompt", PROMPT, *sum((["--step", s] for s in STEPS), [])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_scored"] == len(STEPS) and len(out["step_rewards"]) == len(STEPS)
    assert main(["serve", "--reward-model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    # A corrupt checkpoint is named before anything starts (the running app is untouched).
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints[0]["1"], corrupt)
    (corrupt / "config.json").write_text("{")
    assert main(["serve", "--reward-model", str(corrupt), "--host", "0.0.0.0"]) == 2
    assert f"{corrupt / 'config.json'} is not valid JSON" in capsys.readouterr().err
    assert server["client"].get("/health").status_code == 200


def test_binding_beyond_loopback_without_a_token_warns(monkeypatch):
    from dense_irl.serving.launch import exposure_warning

    monkeypatch.delenv("DENSE_IRL_TOKEN", raising=False)
    assert "without a token" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("0.0.0.0", "t") is None
    monkeypatch.setenv("DENSE_IRL_TOKEN", "t")
    assert exposure_warning("0.0.0.0", None) is None

