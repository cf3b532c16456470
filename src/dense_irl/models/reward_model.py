"""The step-level reward model: an LM backbone with a token-reward head ``g`` and a potential head ``h``.

The heads read the backbone's hidden states at ``head_layer`` (the last layer's by default; a middle layer's
holds more of what tells a wrong step from a right one in a small pretrained LM, docs/experiments.md).

One forward pass over a batch of chains gives every token's reward and the reward of every step:

    r_t = alpha * tau(s_t, a_t) * log pi_theta(a_t | s_t) * [lm in terms] + g(s_t, a_t) * [heads in terms]
    R_k = sum_{t in step k} r_t + gamma * h(end_k) - h(start_k)            (h only with "heads")

The ``lm`` term is the inverse soft-Q reading of the backbone: its logits are ``Q(s, .)``, ``V =
logsumexp Q``, and ``Q(s_t, a_t) - V(s_t) = log pi_theta(a_t | s_t)``, which equals the soft-Bellman
reward ``Q(s_t, a_t) - gamma V(s_{t+1})`` up to potential shaping by ``V`` (so the optimal policy is the
same). ``tau = exp(t(s_t, a_t))`` is a learned per-token temperature (``token_temperature``; else 1): the
discriminator learns where a surprising token is evidence of an error (a wrong digit) and where it is a
writer's free choice that experts and negatives share (the wording of a step). ``h(start_k)`` reads the
state just before the step, ``h(end_k)`` the state after its last token; the terminal potential is 0.
Paragraph and task rewards sum the step rewards of their span: the shaping telescopes, so the three levels
agree.

What a checkpoint serves (``readout``): ``reward``, the step reward ``R_k`` above; or ``logit``, the AIRL
discriminator logit ``R_k - alpha * log pi_theta(step k)``, which is AIRL's own policy reward ``log D -
log(1 - D)`` with the backbone read as the policy the discriminator was trained against (offline: the frozen
SFT policy). ``logit`` leaves out the step's plain log-probability, which grows with the step's length; what
remains is what the discriminator learned. Saved in the HF layout: the backbone's ``save_pretrained`` folder plus ``reward_head.safetensors``
and ``reward_config.json``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dense_irl.data.layout import Chain, EncodedBatch, encode_chains, sum_by_step
from dense_irl.errors import CheckpointError, MissingFileError
from dense_irl.io import atomic_dir
from dense_irl.models.chains import logprobs_at_pass, token_logprobs
from dense_irl.models.hf_files import check_model_folder, check_safetensors, load_causal_lm, load_tokenizer

CONFIG_FILE = "reward_config.json"
READOUTS = ("reward", "logit")
HEAD_FILE = "reward_head.safetensors"


@dataclass
class RewardModelConfig:
    """What a reward-model checkpoint needs to score chains the way it was trained."""

    terms: str = "lm+heads"  # "heads" (g + shaped h), "lm" (alpha * log pi_theta) or "lm+heads"
    potential: bool = True  # the h shaping term (off for the GAIL-logit ablation)
    gamma: float = 1.0
    alpha: float = 1.0
    separator: str = "\n"
    max_length: int = 256
    paragraph_steps: int = 2  # a paragraph is this many consecutive steps
    token_temperature: bool = False  # scale each token's log-prob by a learned exp(t(s_t, a_t))
    readout: str = "reward"  # what score() serves: "reward" (R_k) or "logit" (R_k - alpha * log pi(step k))
    head_layer: int = -1  # the hidden states the heads read (hidden_states[head_layer]: -1 the last layer's)
    threshold: float = 0.0  # first-error rule: first step whose reward is below this
    threshold_rule: str = "default 0.0"
    version: str = "0"


@dataclass
class ChainScore:
    """The reward model's verdict on one chain."""

    step_rewards: list[float]
    paragraph_rewards: list[float]
    task_reward: float
    first_error: int  # first step whose reward is below the threshold, -1 when none
    steps_scored: int  # fewer than given when the chain was truncated to max_length


class RewardModel(nn.Module):
    """Backbone causal LM + ``g`` (token reward) and ``h`` (potential) scalar heads."""

    def __init__(self, backbone, tokenizer, config: RewardModelConfig):
        super().__init__()
        if config.terms not in ("heads", "lm", "lm+heads"):
            raise ValueError(f"terms must be 'heads', 'lm' or 'lm+heads', got {config.terms!r}")
        if config.readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {config.readout!r}")
        n_layers = backbone.config.num_hidden_layers
        if not -(n_layers + 1) <= config.head_layer <= n_layers:
            raise ValueError(f"head_layer {config.head_layer} is not a layer of a {n_layers}-layer backbone "
                             f"(its hidden states are numbered 0..{n_layers}, or -1 for the last)")
        self.backbone, self.tokenizer, self.config = backbone, tokenizer, config
        hidden = backbone.config.hidden_size
        self.g_head, self.h_head, self.t_head = nn.Linear(hidden, 1), nn.Linear(hidden, 1), nn.Linear(hidden, 1)
        # Zero init: a fresh reward model gives every step reward 0 (temperature 1), the neutral start.
        for head in (self.g_head, self.h_head, self.t_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        # The heads read (hidden - shift) / scale: the identity unless fitted (fit_head_norm). A pretrained LM's
        # hidden states have a few dimensions hundreds of times larger than the rest, which a linear head on the
        # raw states learns slowly or unstably.
        self.register_buffer("head_shift", torch.zeros(hidden))
        self.register_buffer("head_scale", torch.ones(hidden))

    @torch.no_grad()
    def fit_head_norm(self, hidden: torch.Tensor) -> None:
        """Set the heads' input standardisation from hidden states ``hidden`` (N, H) of the training chains."""
        hidden = hidden.float()
        self.head_shift.copy_(hidden.mean(0))
        self.head_scale.copy_(hidden.std(0).clamp(min=1e-3))

    def backbone_outputs(self, enc: EncodedBatch, backbone_grad: bool = True):
        """The backbone's pass: ``(hidden states the heads read, LM logits)``, (B, T, H) and (B, T, V)."""
        device = self.g_head.weight.device
        with contextlib.nullcontext() if backbone_grad else torch.no_grad():
            out = self.backbone(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                                output_hidden_states=True)
        return out.hidden_states[self.config.head_layer], out.logits

    def forward(self, enc: EncodedBatch, detach_backbone: bool = False, backbone_grad: bool = True,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Token rewards (B, T), step rewards (B, S), the served step scores (B, S, the ``readout``),
        potentials, the token log-probs and LM logits for an encoded batch.

        ``detach_backbone``: the rewards do not backpropagate into the backbone (only into the heads);
        the returned ``logits`` still do. ``backbone_grad`` False: the backbone runs without a graph at all
        (rows whose loss only trains the heads). ``features``: ``(hidden, token log-probs)`` of a frozen backbone
        computed before (``algo.frozen_features``); the backbone does not run and ``logits`` is None.
        """
        device = self.g_head.weight.device
        ids = enc.input_ids.to(device)
        needs_logp = "lm" in self.config.terms or self.config.readout == "logit"
        if features is None and not torch.is_grad_enabled() and needs_logp:
            # scoring: log pi at the steps' tokens only (the rewards are sums over steps), no lse, no full logits
            logp, hidden = logprobs_at_pass(self.backbone, ids, enc.attention_mask.to(device),
                                            enc.step_ids.to(device) >= 0, self.config.head_layer)
            logits = lse = None
            r_hidden = hidden
        elif features is None:
            hidden, logits = self.backbone_outputs(enc, backbone_grad)
            r_hidden, r_logits = (hidden.detach(), logits.detach()) if detach_backbone else (hidden, logits)
            # log pi_theta per token: the lm term's, and what the logit readout leaves out
            logp = lse = None
            if needs_logp:
                logp, lse = token_logprobs(r_logits, ids, with_lse=True)
        else:
            logits = lse = None
            hidden, logp = (f.to(device=device, dtype=torch.float32) for f in features)
            r_hidden = hidden
        out = self.rewards(enc, r_hidden, logp)
        # token_lse: the logsumexp of the same pass (the iq terms reuse both rather than pass over the vocabulary
        # again); they carry the backbone's graph unless detach_backbone
        return {**out, "logits": logits, "hidden": hidden, "token_logp": logp, "token_lse": lse}

    def rewards(self, enc: EncodedBatch, hidden: torch.Tensor, logp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The heads on the backbone's ``hidden`` states and token log-probs ``logp``: token rewards, step
        rewards, the served step scores and the potentials (the formula of the module docstring)."""
        device = self.g_head.weight.device
        step_ids, S = enc.step_ids.to(device), enc.step_mask.shape[1]
        start, end = enc.step_start.to(device), enc.step_end.to(device)
        gamma, terms = self.config.gamma, self.config.terms
        hidden = (hidden - self.head_shift.to(hidden.dtype)) / self.head_scale.to(hidden.dtype)
        token_r = torch.zeros(step_ids.shape, dtype=torch.float32, device=device)  # fp32 sums under autocast
        if "lm" in terms:
            tempered = logp
            if self.config.token_temperature:  # clamped: a temperature between e^-6 and e^3
                tempered = logp * torch.exp(self.t_head(hidden)[..., 0].clamp(-6.0, 3.0))
            token_r = token_r + self.config.alpha * tempered
        if "heads" in terms:
            token_r = token_r + self.g_head(hidden)[..., 0]
        step_r = sum_by_step(token_r, step_ids, S)
        h_before = h_after = torch.zeros_like(step_r)
        if "heads" in terms and self.config.potential:
            h = self.h_head(hidden)[..., 0]
            h_before = h.gather(1, (start - 1).clamp(min=0))
            # The state after a finished chain's last step is terminal: its potential is 0.
            n_steps = torch.tensor(enc.n_steps, device=device)
            last = torch.arange(S, device=device)[None] == (n_steps - 1)[:, None]
            if enc.partial is not None:
                last = last & ~torch.tensor(enc.partial, device=device)[:, None]
            h_after = h.gather(1, end).masked_fill(last, 0.0)
            step_r = step_r + gamma * h_after - h_before
        step_r = step_r.masked_fill(~enc.step_mask.to(device), 0.0)
        scores = step_r
        if self.config.readout == "logit":
            plain = sum_by_step(self.config.alpha * logp, step_ids, S)
            scores = (step_r - plain).masked_fill(~enc.step_mask.to(device), 0.0)
        return {"token_rewards": token_r, "step_rewards": step_r, "step_scores": scores,
                "h_before": h_before, "h_after": h_after}

    @torch.no_grad()
    def score(self, chains: list[Chain], batch_size: int = 32, progress: str | None = None,
              finished: list[bool] | None = None) -> list[ChainScore]:
        """Score every step of every chain (one forward pass per batch, never one per prefix).

        Chains are batched by length (less padding) and returned in the order given; ``progress`` labels a
        progress bar over the chains (None: none); ``finished[i]`` False scores chain ``i`` as a partial chain
        whose last step is followed by more (``data.layout.encode_chains``)."""
        from tqdm import tqdm

        self.eval()
        order = sorted(range(len(chains)), key=lambda i: len(chains[i][0]) + sum(len(s) for s in chains[i][1]))
        out: list[ChainScore | None] = [None] * len(chains)
        with tqdm(total=len(chains), desc=progress, unit="chain", disable=progress is None, mininterval=2) as bar:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                enc = encode_chains(self.tokenizer, [chains[j] for j in idx], self.config.max_length,
                                    self.config.separator, None if finished is None else [finished[j] for j in idx])
                step_r = self(enc)["step_scores"].float().cpu()
                for b, n in enumerate(enc.n_steps):
                    out[idx[b]] = self._chain_score(step_r[b, :n].tolist())
                bar.update(len(idx))
        return out

    def _chain_score(self, rewards: list[float]) -> ChainScore:
        p = max(1, self.config.paragraph_steps)
        paragraphs = [sum(rewards[j : j + p]) for j in range(0, len(rewards), p)]
        first = next((k for k, r in enumerate(rewards) if r < self.config.threshold), -1)
        return ChainScore(rewards, paragraphs, float(sum(rewards)), first, len(rewards))

    def save_pretrained(self, path: str | Path) -> None:
        """Write the checkpoint folder atomically (backbone, tokenizer, heads, config)."""
        from dense_irl.models.training import save_model

        with atomic_dir(path) as tmp:
            save_model(self.backbone, tmp)  # adapters merged for serving, and kept under adapter/
            self.tokenizer.save_pretrained(tmp)
            heads = {f"g_head.{k}": v for k, v in self.g_head.state_dict().items()}
            heads |= {f"h_head.{k}": v for k, v in self.h_head.state_dict().items()}
            heads |= {f"t_head.{k}": v for k, v in self.t_head.state_dict().items()}
            heads |= {"head_norm.shift": self.head_shift, "head_norm.scale": self.head_scale}
            save_file({k: v.contiguous().cpu() for k, v in heads.items()}, str(tmp / HEAD_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> RewardModel:
        """Load a checkpoint written by :meth:`save_pretrained`; one clear error, naming the file, for anything
        missing, truncated or edited (:func:`check_checkpoint` first, then what only loading can tell)."""
        path = Path(path)
        config = check_checkpoint(path)
        backbone = load_causal_lm(path, "reward model checkpoint", checked=True)  # check_checkpoint did
        model = cls(backbone, load_tokenizer(path, "reward model checkpoint"), config)
        heads = load_file(str(path / HEAD_FILE))
        try:
            model.g_head.load_state_dict({k[7:]: v for k, v in heads.items() if k.startswith("g_head.")})
            model.h_head.load_state_dict({k[7:]: v for k, v in heads.items() if k.startswith("h_head.")})
            if config.token_temperature:
                model.t_head.load_state_dict({k[7:]: v for k, v in heads.items() if k.startswith("t_head.")})
            if "head_norm.shift" in heads:  # checkpoints before the heads' standardisation have none: the identity
                model.head_shift.copy_(heads["head_norm.shift"])
                model.head_scale.copy_(heads["head_norm.scale"])
        except RuntimeError as e:  # missing keys, or shapes that do not fit the backbone
            raise CheckpointError(f"{path / HEAD_FILE} does not fit the backbone in {path} "
                                  f"({str(e).strip().splitlines()[-1].strip()[:300]})") from None
        return model.to(device).eval()


def check_checkpoint(path: str | Path) -> RewardModelConfig:
    """The cheap checks of a reward-model checkpoint folder (no weights are read): its config files parse, its
    files exist, every safetensors header parses. Returns its config; raises one error naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"reward model checkpoint not found: {path}")
    if not (path / CONFIG_FILE).is_file():
        raise MissingFileError(
            f"{path} is not a dense-irl reward model checkpoint (no {CONFIG_FILE}); "
            "train one with 'dense-irl train-reward'"
        )
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        config = RewardModelConfig(**raw)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a valid reward model config: {e}") from e
    if not (path / HEAD_FILE).is_file():
        raise MissingFileError(f"reward model checkpoint {path} is missing {HEAD_FILE}")
    if config.terms not in ("heads", "lm", "lm+heads"):
        raise CheckpointError(f"{path / CONFIG_FILE}: terms must be 'heads', 'lm' or 'lm+heads', got {config.terms!r}")
    if config.readout not in READOUTS:
        raise CheckpointError(f"{path / CONFIG_FILE}: readout must be one of {list(READOUTS)}, got "
                              f"{config.readout!r}")
    check_safetensors(path / HEAD_FILE)
    check_model_folder(path, "reward model checkpoint")
    return config
