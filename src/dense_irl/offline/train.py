"""Offline IRL of the step reward model (``dense-irl train-reward``), top to bottom.

    data -> (calibration, train) split
    SFT warm start of the policy on the train demonstrations
    reward model = the SFT policy + zero-init heads; pi_old = the frozen SFT policy
    policy negatives (optional): the SFT policy continues expert prefixes; its wrong chains join the negatives
    reward steps: experts (label 1) vs negatives (label 0), the AIRL + iq losses (algo.losses)
    calibrate the first-error threshold on the held-out calibration chains
    checkpoint (atomic)

Here the negatives are perturbations of the experts and, with ``reward.policy_negatives``, the SFT policy's
continuations of expert prefixes (``offline.policy_negatives``); the online loop (``dense_irl.runtime``) samples
its policy afresh each iteration. Only chain-level labels (expert or not) are used.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch

from dense_irl.algo.batches import RewardBatch
from dense_irl.algo.config import reward_model_config
from dense_irl.algo.experience import perturbed_negatives, split_demos
from dense_irl.algo.frozen_features import FrozenFeatures
from dense_irl.algo.losses import loss_chains, reward_loss
from dense_irl.algo.microbatch import Accumulator, micro_batches, row_lengths, select_rows
from dense_irl.algo.optim import Optimizer
from dense_irl.algo.sft import LocalSFT, budget, train_sft
from dense_irl.config import save_config
from dense_irl.data.demos import load_data
from dense_irl.data.layout import ChainLayout, encode_chains
from dense_irl.data.perturb import make_processbench
from dense_irl.errors import ConfigError
from dense_irl.eval.localisation import calibrate_threshold, first_error, processbench_metrics
from dense_irl.io import MetricsLog, atomic_path, write_json
from dense_irl.models.branching import branch_start, family_step_logprobs
from dense_irl.models.chains import report_truncated
from dense_irl.models.factory import load_policy, save_policy
from dense_irl.models.reward_model import RewardModel
from dense_irl.models.training import (
    autocast,
    autocast_dtype,
    merged,
    peak_memory_gb,
    prepare_for_training,
    resolve_device,
)
from dense_irl.offline.config import OfflineRewardConfig, TrainRewardConfig
from dense_irl.offline.policy_negatives import FILE as POLICY_NEGATIVES
from dense_irl.offline.policy_negatives import sample_policy_negatives

SFT_STATE = "sft_state.pt"  # the warm start's AdamW and sampler state, beside sft_policy/


def calibration_rows(calib: list, kinds: list[str], seed: int) -> list[dict]:
    """The held-out calibration chains (the calibration demos, perturbed): the first-error threshold's."""
    return make_processbench(calib, kinds=kinds, seed=seed + 7)


def reward_optimizer(rm: RewardModel, cfg: OfflineRewardConfig, sft: tuple[dict, float] | None) -> Optimizer:
    """The reward model's optimiser over its trainable parameters; with ``cfg.continue_sft_optimizer`` the
    backbone goes on with the warm start's AdamW moments and lr (``sft``: its saved state and lr), the heads
    start fresh at ``cfg.lr``."""
    schedule = (cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps, cfg.min_lr_ratio)
    if not cfg.continue_sft_optimizer:
        return Optimizer([p for p in rm.parameters() if p.requires_grad], cfg.lr, *schedule)
    if sft is None:
        raise ConfigError("reward.continue_sft_optimizer needs an SFT warm start in this run (sft.max_steps > 0, "
                         "reward.init: sft)")
    backbone = [p for p in rm.backbone.parameters() if p.requires_grad]  # the SFT optimiser's, in its order
    heads = [p for n, p in rm.named_parameters() if not n.startswith("backbone.")]
    opt = Optimizer([{"params": backbone, "lr": sft[1]}, {"params": heads, "lr": cfg.lr}], cfg.lr, *schedule)
    moments = sft[0]["optimizer"]["optimizer"]["state"]  # by position in the policy's parameters: rm.backbone's
    for i, p in enumerate(backbone):
        if i in moments:  # a parameter that never had a gradient in SFT has no moments yet
            opt.opt.state[p] = {k: v.clone() for k, v in moments[i].items()}
    return opt


def train_reward(rm: RewardModel, pi_old, demos, cfg: OfflineRewardConfig, kinds, log, log_every: int = 25,
                 sft: tuple[dict, float] | None = None, autocast_dtype=None,
                 sampled: dict[int, list] | None = None, totals: dict | None = None) -> int:
    """Reward steps on ``rm``: experts vs perturbed experts (and policy continuations); returns the steps taken
    (and, into ``totals`` when given, ``tokens`` and ``seconds`` of the steps, feature caching not counted).

    With ``cfg.negative_pool`` > 0 each expert has that many fixed negatives, drawn once, plus its policy
    continuations ``sampled[i]`` (``offline.policy_negatives``), and pi_old's step log-probs of every chain are
    computed the first time it is seen, then reused. With a frozen backbone
    (``cfg.backbone_frozen()``) ``pi_old`` is None: the backbone is pi_old, each chain runs through it once
    (``algo.frozen_features``) and the heads train on its cached outputs; ``cfg.expert_pool`` bounds the
    experts the steps draw from, so that they revisit cached chains.
    """
    frozen = pi_old is None
    rng = random.Random(1)
    pool: dict[int, list] = {}

    def fixed_negatives(i: int) -> list:
        if i not in pool:
            pool[i] = [perturbed_negatives([demos[i]], kinds, rng) for _ in range(cfg.negative_pool)]
            pool[i] += [[neg] for neg in (sampled or {}).get(i, [])]
        return pool[i]

    experts = pool_experts(cfg, demos)
    features = FrozenFeatures(rm) if frozen else None
    t0 = time.monotonic()
    if frozen:  # every chain of the pool through the backbone once, before the (fast) heads steps
        for i in experts if cfg.negative_pool > 0 else []:
            fixed_negatives(i)
        deadline = t0 + 0.9 * 60 * cfg.minutes if cfg.minutes > 0 else None
        experts = cache_features(features, rm, demos, experts, pool, cfg, deadline, autocast_dtype)
        if cfg.head_norm:
            rm.fit_head_norm(features.expert_hidden([(demos[i].prompt, demos[i].steps) for i in experts]))
    elif cfg.head_norm:
        fit_head_norm_at_start(rm, [(demos[i].prompt, demos[i].steps) for i in experts], cfg.micro_batch_tokens,
                               autocast_dtype)
    opt = reward_optimizer(rm, cfg, sft)
    acc = Accumulator(rm, opt, autocast_dtype=autocast_dtype, device_type=rm.g_head.weight.device.type)
    cache: dict = {}
    minutes = max(0.01, cfg.minutes - (time.monotonic() - t0) / 60) if cfg.minutes > 0 else 0.0  # what is left
    steps, tokens, t0 = 0, 0, time.monotonic()
    for step, bar in budget("reward", cfg.max_steps, minutes):
        steps = step + 1
        rm.train()
        picked = rng.sample(experts, min(cfg.batch_size, len(experts)))
        neg_from = picked[: max(1, round(len(picked) * cfg.negatives_per_expert))]
        if cfg.negative_pool > 0:
            negatives = [n for i in neg_from for n in rng.choice(fixed_negatives(i))]
        else:
            negatives = perturbed_negatives([demos[i] for i in neg_from], kinds, rng)
        batch = RewardBatch([(demos[i].prompt, demos[i].steps) for i in picked], negatives)
        logp = None
        if cfg.negative_pool > 0 and not cfg.gail and cfg.objective != "iq" and not frozen:  # pi_old runs once a chain
            chains, finished = loss_chains(batch, cfg)
            logp = family_step_logprobs(pi_old, rm.tokenizer, chains, rm.config.max_length, rm.config.separator,
                                        cache, finished, cfg.micro_batch_tokens, len(batch.experts))
        _, metrics = reward_loss(rm, batch, cfg, pi_old=pi_old, pi_old_logp=logp, acc=acc, forward=features,
                                 max_tokens=cfg.micro_batch_tokens, pi_old_is_backbone=frozen)
        metrics["grad_norm"] = acc.step()
        tokens += metrics["tokens"]
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens / max(1e-9, time.monotonic() - t0):.0f}",
                        refresh=False)
        if log_every and step % log_every == 0:
            log({"phase": "reward", "step": step, **metrics})
    if totals is not None:
        totals.update(tokens=tokens, seconds=time.monotonic() - t0)
    return steps


HEAD_NORM_EXPERTS = 256  # a trainable backbone's head standardisation is fitted on this many experts' states


def fit_head_norm_at_start(rm: RewardModel, chains: list, max_tokens: int, autocast_dtype=None) -> None:
    """``reward.head_norm`` with a trainable backbone: standardise the heads' input by the mean and std of the
    starting backbone's step-token states over the first :data:`HEAD_NORM_EXPERTS` experts (one no-grad pass),
    then keep that standardisation fixed while the backbone trains (a middle layer's raw states are large, and
    without it the heads' first steps swing the discriminator's logits by tens)."""
    features = FrozenFeatures(rm)  # a throwaway cache: only the fit reads it
    chains = chains[:HEAD_NORM_EXPERTS]
    enc = encode_chains(rm.tokenizer, chains, rm.config.max_length, rm.config.separator)
    for rows in micro_batches(row_lengths(enc), max_tokens or int(enc.attention_mask.numel())):
        with autocast(autocast_dtype, rm.g_head.weight.device):
            features.fill(select_rows(enc, rows))
    rm.fit_head_norm(features.expert_hidden(chains))


def pool_experts(cfg: OfflineRewardConfig, demos) -> list[int]:
    """The train demonstrations the reward steps draw their experts from (``reward.expert_pool``)."""
    return list(range(min(cfg.expert_pool, len(demos)) if cfg.expert_pool > 0 else len(demos)))


def cache_features(features: FrozenFeatures, rm: RewardModel, demos, experts: list[int], pool: dict,
                   cfg: OfflineRewardConfig, deadline: float | None, autocast_dtype=None) -> list[int]:
    """Run each expert of ``experts`` and its fixed negatives (``pool``) through the frozen backbone once, as
    the reward steps will (``algo.losses.loss_chains``): the experts longest first, in micro-batches of
    ``cfg.micro_batch_tokens``, each negative only from where it leaves its expert
    (``FrozenFeatures.fill_family``), with a progress bar (under autocast to ``autocast_dtype`` when given);
    returns the experts whose chains all ran before ``deadline``."""

    from tqdm import tqdm

    chains = {i: loss_chains(RewardBatch([(demos[i].prompt, demos[i].steps)],
                                         [n for ns in pool.get(i, []) for n in ns]), cfg) for i in experts}
    enc = encode_chains(rm.tokenizer, [chains[i][0][0] for i in experts], rm.config.max_length,
                        rm.config.separator)
    expert_keys = features.batch_keys(enc)
    negative_keys = [features.keys_of(chains[i][0][1:], chains[i][1][1:]) if len(chains[i][0]) > 1 else []
                     for i in experts]
    total = sum(map(len, expert_keys)) + sum(len(k) - branch_start(expert_keys[r], k)  # a repeated negative runs once
                                             for r, ks in enumerate(negative_keys) for k in set(ks))
    groups = micro_batches(row_lengths(enc), cfg.micro_batch_tokens or int(enc.attention_mask.numel()))
    with tqdm(total=total, desc="reward features", unit="tok", unit_scale=True, mininterval=2) as bar:
        for rows in groups:
            if deadline is not None and time.monotonic() > deadline:
                break
            before = features.tokens_computed
            with autocast(autocast_dtype, rm.g_head.weight.device):
                features.fill_family(select_rows(enc, rows), [(j, k) for j, r in enumerate(rows)
                                                              for k in negative_keys[r]], cfg.micro_batch_tokens)
            bar.update(features.tokens_computed - before)
    keep = [i for r, i in enumerate(experts)
            if all(k in features.cache for k in [expert_keys[r], *negative_keys[r]])]
    if len(keep) < len(experts):
        print(f"note: reward.minutes: the frozen backbone's features cover {len(keep)} of {len(experts)} experts "
              "(the rest left out of the heads' steps)")
    return keep


def calibrate_readout(rm: RewardModel, cal_rows: list[dict], weights: list[float]) -> float:
    """Set the first-error threshold (and the heads' weight) that maximise F1 on held-out chains.

    With the ``lm+heads`` readout and several ``weights``, each step is scored ``lm + w * heads`` for
    every ``w``; the best ``w`` is folded into the ``g`` and ``h`` heads (both are linear, so scaling
    their parameters scales their reward), so the checkpoint scores by one fixed rule. Returns ``w``.
    """
    chains, labels = [(r["problem"], r["steps"]) for r in cal_rows], [r["label"] for r in cal_rows]
    n_steps = [len(r["steps"]) for r in cal_rows]  # a chain cut at max_length is scored on the steps that fit
    terms, best = rm.config.terms, (None, 1.0, 0.0)
    if terms != "lm+heads" or list(weights) == [1.0]:
        scores = [s.step_rewards for s in rm.score(chains, progress="calibrate")]
        rm.config.threshold = calibrate_threshold(scores, labels, n_steps)
        rm.config.threshold_rule = f"maximises F1 on {len(cal_rows)} held-out calibration chains"
        return 1.0
    parts, readout = {}, rm.config.readout
    for part in ("lm", "heads"):  # the logit readout's -log pi term goes with the lm part only
        rm.config.terms, rm.config.readout = part, readout if part == "lm" else "reward"
        parts[part] = [s.step_rewards for s in rm.score(chains, progress=f"calibrate ({part})")]
    rm.config.terms, rm.config.readout = terms, readout
    for w in weights:
        scores = [[a + w * b for a, b in zip(lm, hd)] for lm, hd in zip(parts["lm"], parts["heads"])]
        t = calibrate_threshold(scores, labels, n_steps)
        f1 = processbench_metrics([first_error(s, t) for s in scores], labels)["f1"]
        if best[0] is None or f1 > best[0]:
            best = (f1, w, t)
    _, w, rm.config.threshold = best
    with torch.no_grad():
        for head in (rm.g_head, rm.h_head):
            head.weight.mul_(w)
            head.bias.mul_(w)
    rm.config.threshold_rule = (f"heads weight {w:g} of {list(weights)} and threshold: maximise F1 on "
                                f"{len(cal_rows)} held-out calibration chains")
    return w


def train_reward_model(cfg: TrainRewardConfig) -> dict:
    """The whole offline run; returns a summary (paths, threshold, steps, timings)."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    calib, train = split_demos(load_data(cfg.data), cfg.data.calibration_chains, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    metrics, t0 = MetricsLog(out_dir), time.monotonic()

    def log(m: dict) -> None:
        metrics.write({**m, "time_s": round(time.monotonic() - t0, 2)}, m["step"], m["phase"])

    layout = ChainLayout(cfg.data.separator, cfg.model.max_length)
    policy, tokenizer = load_policy(cfg.model, [d.prompt for d in train] + [s for d in train for s in d.steps],
                                    cfg.seed)
    device = resolve_device(cfg.model.device)
    amp = autocast_dtype(cfg.model.precision, device)
    report_truncated(tokenizer, [(d.prompt, d.steps) for d in train], layout, "train demonstrations")
    policy = prepare_for_training(policy.to(device), cfg.model)
    summary: dict = {"trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad)}
    t = time.monotonic()
    sft_state = None
    if cfg.sft.max_steps > 0:
        sft = LocalSFT(policy, tokenizer, layout, cfg.sft, device, amp)
        sft_state = {**train_sft(sft, train, cfg.sft, seed=cfg.seed, log=log, log_every=cfg.log_every),
                     "optimizer": sft.opt.state_dict()}
        summary["sft_steps"] = sft_state["steps"]
        summary["sft_tokens_per_s"] = round(sft_state["tokens"] / max(1e-9, time.monotonic() - t), 1)
        with atomic_path(out_dir / SFT_STATE) as tmp:  # lets a later run go on with this SFT (the demo's baseline)
            torch.save(sft_state, tmp)
    summary["sft_s"] = round(time.monotonic() - t, 1)
    policy.eval()
    save_policy(policy, tokenizer, out_dir / "sft_policy")

    # The backbone goes on from the SFT policy as it trained (its adapters too, with LoRA); pi_old is that
    # policy frozen, adapters merged.
    if cfg.reward.init == "sft":
        backbone = copy.deepcopy(policy)
    else:
        plain = merged(policy)
        backbone = prepare_for_training(type(plain)(plain.config).to(device), cfg.model)
    rm = RewardModel(backbone, tokenizer, reward_model_config(cfg.reward, layout.separator, layout.max_length))
    rm.to(device)
    if cfg.reward.backbone_frozen():  # only the heads train: pi_old is the backbone, no second copy
        rm.backbone.requires_grad_(False)
        pi_old = None
    else:
        pi_old = merged(policy).requires_grad_(False)
    del policy
    sampled = None
    if cfg.reward.policy_negatives:
        sampled, summary["policy_negatives"] = sample_policy_negatives(
            str(out_dir / "sft_policy"), train, pool_experts(cfg.reward, train), cfg.reward, layout.separator,
            out_dir / POLICY_NEGATIVES, seed=cfg.seed, device=str(device))
    t = time.monotonic()
    warm = (sft_state, cfg.sft.lr) if sft_state is not None and cfg.reward.init == "sft" else None
    totals: dict = {}
    summary["reward_steps"] = train_reward(rm, pi_old, train, cfg.reward, cfg.data.perturbations, log,
                                           cfg.log_every, warm, amp, sampled, totals)
    summary["reward_s"] = round(time.monotonic() - t, 1)
    summary["reward_tokens_per_s"] = round(totals["tokens"] / max(1e-9, totals["seconds"]), 1)

    cal_rows = calibration_rows(calib, cfg.data.perturbations, cfg.seed)
    calibrate_readout(rm, cal_rows, cfg.reward.readout_weights)
    rm.config.version = time.strftime("%Y%m%d-%H%M%S")
    rm.save_pretrained(out_dir / "reward_model")
    metrics.close()
    summary = {"reward_model": str(out_dir / "reward_model"), "sft_policy": str(out_dir / "sft_policy"),
               "threshold": rm.config.threshold, "n_train": len(train), "n_calibration": len(cal_rows), **summary}
    summary["peak_memory_gb"] = peak_memory_gb(device)
    write_json(out_dir / "summary.json", summary)
    return summary
