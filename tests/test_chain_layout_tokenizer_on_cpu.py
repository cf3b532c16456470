"""One chain layout for every path, with a tokenizer whose pre-tokenizer merges punctuation and newlines.

Qwen2 / Llama-3 pre-tokenizers make ``"?\\n"`` one pre-token, so tokenising ``prompt + SEP`` in one piece gives
other ids than tokenising the pieces apart (``data.layout``). A Qwen2-style byte-level BPE tokenizer is built
here with the ``tokenizers`` library (nothing downloaded) beside a tiny random Llama, both saved to disk, and
every path loads them from there: the ids the hf engine continues from are ``prompt_ids``, the head of every
``encode_chains`` row that SFT, the reward model (scoring, its loss, pi_old's log-probs), PPO-ptx and the
HTTP app see, and of every PPO row; PPO trains on exactly the sampled ids, each with its own step's
advantage; and an expert chain given as text encodes the same way everywhere. The vLLM engine's variant is
in ``tests/test_vllm_cpu.py`` (marker ``vllm``).
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dense_irl.algo.batches import Experience, RewardBatch
from dense_irl.algo.config import RewardConfig, RLConfig
from dense_irl.algo.losses import loss_chains
from dense_irl.data.layout import ChainLayout, encode_chains, prompt_ids, split_steps, token_steps
from dense_irl.data.synthetic import SyntheticConfig, generate

# Ray Serve's own pydantic models (imported with the app) warn about deprecated Field arguments; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
SEP = "\n"
MAX_LENGTH = 256
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Small micro-batches, so the learners' row selection and trimming is on the path too.
RL = RLConfig(ppo_steps=1, ptx_coef=1.0, micro_batch_tokens=300)
SEP_PRIOR, EOS_PRIOR = 1.2, 0.6
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def qwen2_style_tokenizer(texts: list[str], vocab_size: int = 500):
    """Byte-level BPE with Qwen2's pre-tokenizer (regex split, then bytes) and decoder, trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def layout_row(tok, prompt: str, steps: list[str], finished: bool = True) -> list[int]:
    """``<s> prompt SEP | step_0 SEP | ... | step_last </s>``, written out by hand, every piece apart (a partial
    chain's last step closed by ``SEP``)."""
    row = [tok.bos_token_id] + _ids(tok, prompt) + _ids(tok, SEP)
    for k, step in enumerate(steps):
        row += _ids(tok, step) + ([tok.eos_token_id] if k == len(steps) - 1 and finished else _ids(tok, SEP))
    return row


def _bias_towards_steps(model, tok) -> None:
    """Make the random model write chains: many step ends (newline tokens, merged ones too), some ``</s>``,
    nothing but ASCII text. A constant feature in every embedding carries a per-token prior to the logits;
    the rest of the weights stay random, so the samples still depend on their context."""
    prior = torch.zeros(len(tok))
    for i in range(len(tok)):
        text = tok.decode([i])
        if i == tok.eos_token_id:
            prior[i] = EOS_PRIOR
        elif i in tok.all_special_ids or not text or not all(c == SEP or " " <= c <= "~" for c in text):
            prior[i] = -30.0
        elif SEP in text:
            prior[i] = SEP_PRIOR
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0
        model.lm_head.weight[:, 0] = prior / 3.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in the Ray actors: tiny matmuls on a shared 2-core machine are far faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_world(root: Path) -> SimpleNamespace:
    """The tokenizer and a tiny random Llama saved together in ``root / "policy"``, as a policy is saved; the
    tokenizer as loaded back from there, and a few demonstrations. (Head size 32: vLLM's CPU kernels take it.)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    demos = generate(SyntheticConfig(n_problems=150, seed=7))
    tok = qwen2_style_tokenizer([d.prompt + SEP + SEP.join(d.steps) + SEP for d in demos])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    _bias_towards_steps(model, tok)
    path = root / "policy"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return SimpleNamespace(path=str(path), tok=AutoTokenizer.from_pretrained(path), demos=demos[:4])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("qwen2_style"))


def test_premise_pieces_apart_differ_from_one_piece(world):
    """Without this the test would pass for a tokenizer where the layout's care changes nothing."""
    tok = world.tok
    merged = [t for t in ("?" + SEP, "." + SEP) if len(_ids(tok, t)) == 1]
    assert merged == ["?" + SEP, "." + SEP], "the tokenizer has no merged punctuation+newline tokens"
    for d in world.demos:
        assert d.prompt.endswith("?") and d.steps[0].endswith(".")
        one_piece = [tok.bos_token_id] + _ids(tok, d.prompt + SEP)
        assert prompt_ids(tok, d.prompt, SEP) != one_piece
        assert prompt_ids(tok, d.prompt, SEP) == [tok.bos_token_id] + _ids(tok, d.prompt) + _ids(tok, SEP)
        assert layout_row(tok, d.prompt, d.steps) != [tok.bos_token_id] + _ids(
            tok, d.prompt + SEP + SEP.join(d.steps)) + [tok.eos_token_id]


@pytest.fixture(scope="module")
def rollouts(world):
    """Samples of the hf engine (in process), with the ids each generate call was given."""
    from dense_irl.sampling.engines import HFEngine, RolloutConfig

    engine = HFEngine(world.path, seed=0)
    calls, generate_ = [], engine.model.generate

    def spy(**kw):
        calls.append((kw["input_ids"].cpu(), kw["attention_mask"].cpu()))
        return generate_(**kw)

    engine.model.generate = spy
    prompts = [d.prompt for d in world.demos]
    cfg = RolloutConfig(temperature=1.0, top_p=1.0, max_new_tokens=40, batch_size=5)
    groups = engine.generate(prompts, 3, cfg, SEP, seed=0)
    heads = [ids[m.bool()].tolist() for batch, mask in calls for ids, m in zip(batch, mask)]
    return SimpleNamespace(groups=groups, heads=heads, prompts=prompts)


def test_hf_engine_continues_from_prompt_ids(world, rollouts):
    tok = world.tok
    expected = [prompt_ids(tok, p, SEP) for p in rollouts.prompts for _ in range(3)]
    assert rollouts.heads == expected  # left padding stripped: exactly <s> prompt SEP, pieces apart
    for p, group in zip(rollouts.prompts, rollouts.groups):
        assert len(group) == 3
        for r in group:
            assert r.prompt == p and len(r.token_ids) == len(r.logprobs) > 0
            assert r.completion == tok.decode(r.token_ids, skip_special_tokens=True)
            assert r.steps == split_steps(r.completion, SEP)
            assert r.finished == (r.token_ids[-1] == tok.eos_token_id)
    flat = [r for g in rollouts.groups for r in g]
    # The samples exercise what the layout is about: merged step ends, several steps, finished and not.
    merged = {_ids(tok, "." + SEP)[0], _ids(tok, "?" + SEP)[0]}
    assert any(set(r.token_ids) & merged for r in flat)
    assert any(len(r.steps) >= 3 for r in flat)
    assert any(r.finished for r in flat) and not all(r.finished for r in flat)


def _spy_forward(monkeypatch, module, seen: list, continued: list | None = None) -> None:
    """Record every forward pass of ``module``: its rows, padding stripped (micro-batches may reorder them).
    A pass over a key/value cache (``models.branching``) goes to ``continued`` as (visible past positions, new
    row) pairs."""
    forward = module.forward

    def spy(*args, **kw):
        ids = kw["input_ids"] if "input_ids" in kw else args[0]
        mask = kw.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        ids, mask = ids.detach().cpu(), mask.detach().cpu()
        if mask.shape[1] > ids.shape[1]:  # the past's columns come first
            past = mask[:, : mask.shape[1] - ids.shape[1]].sum(1).tolist()
            continued.extend(zip(past, _rows(ids, mask[:, -ids.shape[1]:])))
        else:
            seen.extend(_rows(ids, mask))
        return forward(*args, **kw)

    monkeypatch.setattr(module, "forward", spy)


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(ids, mask)]


@pytest.fixture
def policy_learner(world, monkeypatch):
    """The policy learner of the loop, in this process (torch backend, one rank)."""
    from dense_irl.runtime.learners import LearnerConfig, PolicyLearner, RankSpec, free_port

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "")  # _setup writes them; monkeypatch puts the old values back
    return PolicyLearner.__ray_actor_class__(
        world.path, learner=LearnerConfig(), layout=ChainLayout(SEP, MAX_LENGTH), opt=RL,
        group=RankSpec(master=f"127.0.0.1:{free_port()}"))


def test_ppo_trains_on_the_sampled_ids_and_ptx_on_the_layout(world, rollouts, policy_learner, monkeypatch):
    tok = world.tok
    flat = [r for g in rollouts.groups for r in g]
    # A distinct advantage per rollout and step, so a token given its neighbour's step shows.
    advantages = [[100.0 * i + k for k in range(len(r.steps))] for i, r in enumerate(flat)]
    experts = [(d.prompt, d.steps) for d in world.demos]
    exp = Experience(flat, advantages, experts)
    batch = exp.tensors(tok, SEP, "cpu")
    for b, (r, adv) in enumerate(zip(flat, advantages)):
        head = prompt_ids(tok, r.prompt, SEP)
        n, m = len(head), len(r.token_ids)
        assert batch["input_ids"][b, :n].tolist() == head == rollouts.heads[b] == r.prompt_ids
        assert batch["input_ids"][b, n : n + m].tolist() == r.token_ids  # the sampled ids, not re-tokenised
        assert batch["mask"][b].nonzero()[:, 0].tolist() == list(range(n, n + m))
        assert batch["attention_mask"][b].sum() == n + m
        assert batch["old_logp"][b, n : n + m].tolist() == pytest.approx(r.logprobs)
        # Each sampled token carries its own step's advantage: the step whose text it starts in.
        steps_of = token_steps(tok, r.token_ids, SEP)
        assert batch["advantages"][b, n : n + m].tolist() == [adv[min(k, len(adv) - 1)] if adv else 0.0
                                                              for k in steps_of]
        assert steps_of == sorted(steps_of) and (not r.steps or steps_of[-1] == len(r.steps) - 1)
        for k, step in enumerate(r.steps):  # the tokens given to step k spell step k (and its separators)
            text = tok.decode([t for t, s in zip(r.token_ids, steps_of) if s == k], skip_special_tokens=True)
            assert text.strip() == step
    # The policy learner's PPO-ptx step: every row its model sees is a PPO row or an expert's layout row.
    seen: list[list[int]] = []
    _spy_forward(monkeypatch, policy_learner.module, seen)
    stats = policy_learner.policy_step(exp, RL)
    ppo_rows = _rows(batch["input_ids"], batch["attention_mask"])
    expert_rows = [layout_row(tok, p, s) for p, s in experts]
    assert sorted(seen) == sorted(ppo_rows * 2 + expert_rows)  # old log-probs, then one PPO-ptx step
    # The learner's recomputed log-probs of the sampled tokens are the engine's: same ids, same positions.
    assert stats["behaviour_logp_gap"] < 1e-4


def test_sft_rows_are_the_layout(world, policy_learner, monkeypatch):
    """SFT (in process and the learner's warm-start step) trains on the layout rows, targets = the steps."""
    from dense_irl.algo.sft import sft_loss

    tok = world.tok
    # The demonstrations as text files give them: one solution text, split by split_steps.
    experts = [(d.prompt, split_steps(SEP.join(d.steps) + SEP, SEP)) for d in world.demos]
    assert experts == [(d.prompt, d.steps) for d in world.demos]
    rows = [layout_row(tok, p, s) for p, s in experts]
    enc = encode_chains(tok, experts, MAX_LENGTH, SEP)
    assert _rows(enc.input_ids, enc.attention_mask) == rows
    for b, (prompt, _) in enumerate(experts):
        head = len(prompt_ids(tok, prompt, SEP))
        assert enc.step_ids[b, :head].tolist() == [-1] * head  # the prompt is context, every step a target
        assert (enc.step_ids[b, head : len(rows[b])] >= 0).all()
    seen: list[list[int]] = []
    model = policy_learner.module
    _spy_forward(monkeypatch, model, seen)
    sft_loss(model, tok, experts, ChainLayout(SEP, MAX_LENGTH))
    policy_learner.sft_step(experts)
    assert sorted(seen) == sorted(rows * 2)


@pytest.fixture(scope="module")
def reward_path(world, tmp_path_factory):
    """A reward model on the policy's backbone and tokenizer, saved as training saves it."""
    from transformers import AutoModelForCausalLM

    from dense_irl.models.reward_model import RewardModel, RewardModelConfig

    rm = RewardModel(AutoModelForCausalLM.from_pretrained(world.path), world.tok,
                     RewardModelConfig(separator=SEP, max_length=MAX_LENGTH))
    path = tmp_path_factory.mktemp("rm") / "reward_model"
    rm.save_pretrained(path)
    return str(path)


def test_reward_learner_scores_and_trains_on_the_layout(world, rollouts, reward_path, monkeypatch):
    """The reward learner (in process): scoring the samples, the reward step and pi_old's step log-probs."""
    from dense_irl.algo.experience import perturbed_negatives, policy_negatives
    from dense_irl.data.perturb import KINDS
    from dense_irl.runtime.learners import LearnerConfig, RankSpec, RewardLearner, free_port

    tok = world.tok
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "")
    learner = RewardLearner.__ray_actor_class__(
        reward_path, world.path, reward=RewardConfig(micro_batch_tokens=300), learner=LearnerConfig(),
        group=RankSpec(master=f"127.0.0.1:{free_port()}"))
    rm_rows: list[list[int]] = []
    old_rows: list[list[int]] = []
    old_continued: list[tuple[int, list[int]]] = []
    _spy_forward(monkeypatch, learner.rm.backbone, rm_rows)
    _spy_forward(monkeypatch, learner.pi_old, old_rows, old_continued)
    samples = [r for g in rollouts.groups for r in g if r.steps]  # the driver scores samples with steps
    chains = [(r.prompt, r.steps) for r in samples]
    rewards = learner.score(chains)
    assert sorted(rm_rows) == sorted(layout_row(tok, p, s) for p, s in chains)
    assert [len(r) for r in rewards] == [len(r.steps) for r in samples]  # one reward per step, none truncated
    # A reward step: the experts, policy samples and perturbed experts as negatives.
    demo_of = {d.prompt: d for d in world.demos}
    negatives = policy_negatives([(demo_of[r.prompt], r) for r in samples[:4]])
    negatives += perturbed_negatives(world.demos[:2], list(KINDS), random.Random(0))
    assert len(negatives) == 6
    batch = RewardBatch([(d.prompt, d.steps) for d in world.demos], negatives)
    rm_rows.clear()
    learner.reward_step(batch)
    # (a negative runs up to the step where it leaves its expert: the loss reads nothing after it)
    chains, finished = loss_chains(batch, learner.reward_cfg)
    assert sum(not f for f in finished) > 0 and chains[: len(world.demos)] == batch.experts
    want = sorted(layout_row(tok, p, s, f) for (p, s), f in zip(chains, finished))
    assert sorted(map(list, set(map(tuple, rm_rows)))) == sorted(map(list, set(map(tuple, want))))
    # pi_old: the experts whole; each negative runs from where it leaves its expert, over that expert's cache
    assert old_continued and sorted(old_rows) == sorted(layout_row(tok, p, s) for p, s in batch.experts)
    rebuilt = [next(e[:n] + new for e in old_rows if e[:n] + new in want) for n, new in old_continued]
    assert sorted(old_rows + rebuilt) == want


def test_http_app_scores_the_layout(world, rollouts, reward_path, monkeypatch):
    """What the scoring server parses from requests and scores: the chains and rows every other path uses."""
    from dense_irl.models.reward_model import RewardModel
    from dense_irl.serving.requests import item_chain, query_chains
    from dense_irl.serving.schemas import ChainIn, GetRewardRequest

    tok = world.tok
    rm = RewardModel.from_pretrained(reward_path)
    sep = rm.config.separator
    experts = [(d.prompt, d.steps) for d in world.demos]
    samples = [r for g in rollouts.groups for r in g if r.steps]
    # /v1/score: an expert chain given as text, as steps, and with the separator already on its prompt.
    as_text = [item_chain(ChainIn(prompt=p, text=SEP.join(s)), sep) for p, s in experts]
    as_steps = [item_chain(ChainIn(prompt=p, steps=s), sep) for p, s in experts]
    sep_prompt = [item_chain(ChainIn(prompt=p + SEP, text=SEP.join(s) + SEP), sep) for p, s in experts]
    assert as_text == as_steps == experts
    # ... a sample sent back as prompt + completion text, and OpenRLHF's /get_reward query (prompt + response,
    # decoded with the special tokens), with and without its prompt's separator.
    from_text = [item_chain(ChainIn(prompt=r.prompt, text=r.completion), sep) for r in samples]
    decoded = [tok.decode(prompt_ids(tok, r.prompt, SEP) + r.token_ids, skip_special_tokens=False) for r in samples]
    from_query = query_chains(GetRewardRequest(query=decoded, prompts=[r.prompt for r in samples]), tok, sep)
    from_query_sep = query_chains(
        GetRewardRequest(query=decoded, prompts=[r.prompt + SEP for r in samples]), tok, sep)
    assert from_text == from_query == [(r.prompt, r.steps) for r in samples]
    assert [s for _, s in from_query_sep] == [r.steps for r in samples]
    no_prompt = query_chains(GetRewardRequest(query=["<pad><pad>" + q for q in decoded[:2]]), tok, sep)
    assert no_prompt == [("", split_steps(r.prompt + SEP + r.completion, SEP)) for r in samples[:2]]
    # Everything the server scores is the layout row; a prompt sent with its separator is the same chain.
    seen: list[list[int]] = []
    _spy_forward(monkeypatch, rm.backbone, seen)
    chains = as_text + sep_prompt + from_query + from_query_sep
    rm.score(chains, 4)
    want = [layout_row(tok, p, s) for p, s in experts * 2 + [(r.prompt, r.steps) for r in samples] * 2]
    assert sorted(seen) == sorted(want)
    assert all(layout_row(tok, r.prompt, r.steps)[: len(r.prompt_ids)] == r.prompt_ids for r in samples)


def test_a_rollout_from_other_prompt_ids_is_refused(world, rollouts):
    """An engine that continued from other ids (say, ``prompt + SEP`` tokenised in one piece) cannot train."""
    from dataclasses import replace

    tok = world.tok
    r = rollouts.groups[0][0]
    assert r.prompt_ids == prompt_ids(tok, r.prompt, SEP)  # the engine records what it continued from
    one_piece = [tok.bos_token_id] + _ids(tok, r.prompt + SEP)
    with pytest.raises(ValueError, match="tokenise differently"):
        Experience([replace(r, prompt_ids=one_piece)], [[0.0] * len(r.steps)]).tensors(tok, SEP, "cpu")
    head = prompt_ids(tok, r.prompt, SEP)  # a rollout built by hand records none: the layout's head is used
    unrecorded = Experience([replace(r, prompt_ids=None)], [[0.0] * len(r.steps)]).tensors(tok, SEP, "cpu")
    assert unrecorded["input_ids"][0, : len(head)].tolist() == head
