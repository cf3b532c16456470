"""Offline IRL: train the step-level reward model from expert chains and perturbed expert chains.

Read top to bottom: data -> SFT warm start of the backbone -> reward-model training (AIRL
discriminator and/or inverse soft-Q) -> threshold calibration on held-out chains -> checkpoint.
Policy samples as negatives come with the online loop (``dense_irl.runtime``); here the negatives
are perturbations of the experts, and only chain-level labels (expert or not) are used.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dense_irl.config import save_config
from dense_irl.data.perturb import KINDS, make_processbench, perturb
from dense_irl.data.readers import load_demonstrations
from dense_irl.data.schema import Demonstration
from dense_irl.data.synthetic import generate
from dense_irl.eval.localisation import calibrate_threshold, first_error, processbench_metrics
from dense_irl.io import atomic_path
from dense_irl.irl.objectives import discriminator_logits, expert_nll, level_bce, td_penalty
from dense_irl.irl.offline_config import (  # noqa: F401 (the run's configs, importable from here too)
    DataConfig,
    RewardConfig,
    SFTConfig,
    TrainRewardConfig,
    check_reward_config,
    reward_model_config,
)
from dense_irl.models.chains import encode_chains, step_logprobs, sum_by_step, token_logprobs
from dense_irl.models.factory import load_policy, save_policy
from dense_irl.models.reward_model import RewardModel

SFT_STATE = "sft_state.pt"  # the warm start's AdamW and sampler state, beside sft_policy/


def load_data(cfg: DataConfig) -> list[Demonstration]:
    """Demonstrations from the synthetic generator or a data file."""
    if cfg.train == "synthetic":
        demos = generate(cfg.synthetic)
    else:
        demos, _ = load_demonstrations(cfg.train, fmt=cfg.format, step_separator=cfg.step_separator)
    if cfg.max_demos:
        demos = demos[: cfg.max_demos]
    if len(demos) < 2:
        raise ValueError(f"data.train={cfg.train!r} gave {len(demos)} demonstrations; need at least 2")
    return demos


def split_demos(cfg: TrainRewardConfig) -> tuple[list[Demonstration], list[Demonstration]]:
    """The run's demonstrations as (calibration, train), the same split for the same config."""
    demos = load_data(cfg.data)
    random.Random(cfg.seed).shuffle(demos)
    n_cal = min(cfg.data.calibration_chains, len(demos) // 5)
    return demos[:n_cal], demos[n_cal:]


def calibration_rows(cfg: TrainRewardConfig, calib: list[Demonstration]) -> list[dict]:
    """The run's held-out calibration chains (its calibration demos, perturbed): the first-error threshold's."""
    return make_processbench(calib, kinds=cfg.data.perturbations, seed=cfg.seed + 7)


def _chains(demos):
    return [(d.prompt, d.steps) for d in demos]


def _loop(name: str, minutes: float, max_steps: int):
    """Yield step numbers until the time budget or the step cap runs out, with a progress bar."""
    deadline = time.monotonic() + 60 * minutes
    bar = tqdm(total=max_steps if max_steps < 100_000 else None, desc=name, unit="step", mininterval=2)
    step = 0
    while step < max_steps and time.monotonic() < deadline:
        yield step
        step += 1
        bar.update(1)
    bar.close()


def train_sft(model, tokenizer, demos, cfg: SFTConfig, max_length: int, separator: str, log,
              resume: dict | None = None) -> dict:
    """Next-token training on the expert steps (prompt tokens are context, not targets).

    Returns the optimiser and sampler state and the steps taken; pass it back as ``resume`` to go on with the
    same run (the "SFT trained as long" baseline must not restart AdamW's moments or replay the first batches).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(0)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        rng.setstate(resume["rng"])
    model.train()
    steps = 0
    for step in _loop("sft", cfg.minutes, cfg.max_steps):
        steps = step + 1
        batch = rng.sample(demos, min(cfg.batch_size, len(demos)))
        enc = encode_chains(tokenizer, _chains(batch), max_length, separator)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        loss = expert_nll(logits, enc.input_ids, enc.step_ids >= 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            log({"phase": "sft", "step": step, "sft_nll": loss.item()})
    return {"optimizer": opt.state_dict(), "rng": rng.getstate(), "steps": steps}


def shared_prefix(steps: list[str], expert_steps: list[str]) -> int:
    """How many leading steps of ``steps`` equal the expert's (where a negative leaves the expert's path)."""
    n = 0
    for a, b in zip(steps, expert_steps):
        if a != b:
            break
        n += 1
    return n


def negatives_for(batch: list[Demonstration], kinds: list[str], rng: random.Random) -> list[tuple]:
    """One perturbed chain per expert (a kind that applies, drawn at random): ``(prompt, steps, shared)``."""
    out = []
    for demo in batch:
        for kind in rng.sample(kinds, len(kinds)):
            res = perturb(demo, kind, rng)
            if res is not None:
                out.append((demo.prompt, res[0], shared_prefix(res[0], demo.steps)))
                break
    return out


def _negative_count(n_experts: int, per_expert: float) -> int:
    return max(1, round(n_experts * per_expert))


def reward_loss(rm: RewardModel, policy, experts: list[tuple], negatives: list[tuple],
                cfg: RewardConfig, forward=None, policy_logp: list[list[float]] | None = None,
                ) -> tuple[torch.Tensor, dict]:
    """The reward objective on one batch: experts (label 1) vs negatives (label 0), plus the iq terms.

    ``policy`` is the frozen pi_old of the AIRL logit (it shares the reward backbone's tokenizer);
    ``forward`` is what runs the model (a DDP / DeepSpeed wrapper of ``rm``), ``rm`` itself by default.
    A negative is ``(prompt, steps, shared)``: its first ``shared`` steps are the expert's own (see
    :func:`shared_prefix`), left out of its loss when ``cfg.mask_expert_prefix``.
    ``policy_logp``: log pi_old of every step of every chain (experts then negatives), when already
    known; then ``policy`` is not run.
    """
    sep, max_len = rm.config.separator, rm.config.max_length
    chains = experts + [(p, s) for p, s, _ in negatives]
    is_expert = torch.tensor([1.0] * len(experts) + [0.0] * len(negatives))
    enc = encode_chains(rm.tokenizer, chains, max_len, sep)
    out = (forward or rm)(enc, detach_backbone=not cfg.disc_backbone_grad)
    S = enc.step_mask.shape[1]
    dev = out["logits"].device
    ids, step_ids, step_mask = enc.input_ids.to(dev), enc.step_ids.to(dev), enc.step_mask.to(dev)
    is_expert = is_expert.to(dev)
    pol_logp = None
    if not cfg.gail and policy_logp is not None:
        pol_logp = torch.zeros(step_mask.shape, device=dev)
        for b, lp in enumerate(policy_logp):
            n = min(len(lp), S)
            pol_logp[b, :n] = torch.tensor(lp[:n], device=dev)
    elif not cfg.gail:
        with torch.no_grad():
            pol_logits = policy(input_ids=ids, attention_mask=enc.attention_mask.to(dev)).logits
            pol_logp = sum_by_step(token_logprobs(pol_logits, ids), step_ids, S)
    logits = discriminator_logits(out["step_rewards"], pol_logp, cfg.alpha, cfg.gail)
    loss_mask = step_mask
    if cfg.mask_expert_prefix:
        loss_mask = step_mask.clone()
        for b, (_, _, shared) in enumerate(negatives):
            loss_mask[len(experts) + b, :shared] = False
            if cfg.divergence_only:
                loss_mask[len(experts) + b, shared + 1 :] = False
    bce = level_bce(logits, loss_mask, is_expert, cfg.label_smoothing, cfg.level_weights, cfg.paragraph_steps)
    loss = bce["total"]
    metrics = {f"bce_{k}": v.item() for k, v in bce.items()}
    with torch.no_grad():
        r, n = out["step_rewards"], len(experts)
        metrics["reward_expert"] = r[:n][step_mask[:n]].mean().item()
        neg = r[n:][loss_mask[n:]]  # the steps where negatives leave the expert's path
        metrics["reward_negative"] = neg.mean().item() if neg.numel() else 0.0
    expert_tokens = (step_ids >= 0) & (is_expert[:, None] > 0)
    iq_terms = cfg.objective in ("iq", "airl+iq")
    if iq_terms and cfg.lm_weight > 0:
        nll = expert_nll(out["logits"], ids, expert_tokens)
        loss = loss + cfg.lm_weight * nll
        metrics["expert_nll"] = nll.item()
    if iq_terms and cfg.td_weight > 0:
        q_taken = out["logits"][:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        v_next = torch.logsumexp(out["logits"][:, 1:], dim=-1)
        td = td_penalty(q_taken - cfg.gamma * v_next, expert_tokens[:, 1:])
        loss = loss + cfg.td_weight * td
        metrics["td"] = td.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def _cached_logp(policy, rm: RewardModel, chains: list[tuple], cache: dict) -> list[list[float]]:
    """log pi_old per step of ``chains``: pi_old is frozen offline, so each chain is run through it once."""
    keys = [(p, tuple(s)) for p, s in chains]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        got = step_logprobs(policy, rm.tokenizer, [(p, list(s)) for p, s in todo], rm.config.max_length,
                            rm.config.separator)
        cache.update(zip(todo, got))
    return [cache[k] for k in keys]


def train_reward(rm: RewardModel, policy, demos, cfg: RewardConfig, kinds, log,
                 sft: tuple[dict, float] | None = None) -> int:
    """Discriminator / inverse soft-Q training of ``rm``: experts vs perturbed experts; returns the steps taken.

    With ``cfg.negative_pool`` > 0 each expert has that many fixed negatives, drawn once, and pi_old's
    step log-probs of every chain are computed the first time it is seen and then reused. ``sft`` is the warm
    start's ``(train_sft state, lr)``: with ``cfg.continue_sft_optimizer`` the backbone goes on with them.
    """
    if cfg.continue_sft_optimizer:
        if sft is None:
            raise ValueError("reward.continue_sft_optimizer needs an SFT warm start in this run (sft.max_steps > 0, "
                             "sft.minutes > 0, reward.init: sft)")
        backbone = list(rm.backbone.parameters())
        heads = [p for n, p in rm.named_parameters() if not n.startswith("backbone.")]
        opt = torch.optim.AdamW([{"params": backbone, "lr": sft[1]}, {"params": heads, "lr": cfg.lr}],
                                weight_decay=0.0)
        moments = sft[0]["optimizer"]["state"]  # by position in the policy's parameters, which rm.backbone copies
        for i, p in enumerate(backbone):
            if i in moments:  # a parameter that never had a gradient in SFT has no moments yet
                opt.state[p] = {k: v.clone() for k, v in moments[i].items()}
    else:
        opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, cfg.warmup_steps)))
    rng = random.Random(1)
    pool: dict[int, list[tuple]] = {}
    cache: dict = {}
    steps = 0
    for step in _loop("reward", cfg.minutes, cfg.max_steps):
        steps = step + 1
        rm.train()
        picked = rng.sample(range(len(demos)), min(cfg.batch_size, len(demos)))
        experts = [demos[i] for i in picked]
        neg_from = picked[: _negative_count(len(picked), cfg.negatives_per_expert)]
        if cfg.negative_pool > 0:
            for i in neg_from:
                if i not in pool:
                    pool[i] = [negatives_for([demos[i]], kinds, rng) for _ in range(cfg.negative_pool)]
            negatives = [n for i in neg_from for n in rng.choice(pool[i])]
        else:
            negatives = negatives_for([demos[i] for i in neg_from], kinds, rng)
        chains = _chains(experts) + [(p, s) for p, s, _ in negatives]
        logp = None
        if cfg.negative_pool > 0 and not cfg.gail:
            logp = _cached_logp(policy, rm, chains, cache)
        loss, metrics = reward_loss(rm, policy, _chains(experts), negatives, cfg, policy_logp=logp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            log({"phase": "reward", "step": step, **metrics})
    return steps


def calibrate_readout(rm: RewardModel, cal_rows: list[dict], weights: list[float]) -> float:
    """Set the first-error threshold (and the heads' weight) that maximise F1 on held-out chains.

    With the ``lm+heads`` readout and several ``weights``, each step is scored ``lm + w * heads`` for
    every ``w``; the best ``w`` is folded into the ``g`` and ``h`` heads (both are linear, so scaling
    their parameters scales their reward), so the checkpoint scores by one fixed rule. Returns ``w``.
    """
    chains, labels = [(r["problem"], r["steps"]) for r in cal_rows], [r["label"] for r in cal_rows]
    terms, best = rm.config.terms, (None, 1.0, 0.0)
    if terms != "lm+heads" or list(weights) == [1.0]:
        rm.config.threshold = calibrate_threshold([s.step_rewards for s in rm.score(chains)], labels)
        rm.config.threshold_rule = f"maximises F1 on {len(cal_rows)} held-out calibration chains"
        return 1.0
    parts = {}
    for part in ("lm", "heads"):
        rm.config.terms = part
        parts[part] = [s.step_rewards for s in rm.score(chains)]
    rm.config.terms = terms
    for w in weights:
        scores = [[a + w * b for a, b in zip(lm, hd)] for lm, hd in zip(parts["lm"], parts["heads"])]
        t = calibrate_threshold(scores, labels)
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


def run(cfg: TrainRewardConfig) -> dict:
    """The whole offline run; returns a summary (paths, threshold, timings)."""
    from torch.utils.tensorboard import SummaryWriter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    check_reward_config(cfg.reward)
    if cfg.reward.continue_sft_optimizer and not (cfg.sft.minutes > 0 and cfg.sft.max_steps > 0
                                                  and cfg.reward.init == "sft"):
        # Checked here, before the warm start spends its minutes, not when the reward phase starts.
        raise ValueError("reward.continue_sft_optimizer needs an SFT warm start in this run (sft.max_steps > 0, "
                         "sft.minutes > 0, reward.init: sft)")
    unknown = sorted(set(cfg.data.perturbations) - set(KINDS))
    if unknown:
        raise ValueError(f"data.perturbations: unknown kind {unknown[0]!r}; valid: {', '.join(KINDS)}")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    separator = cfg.data.step_separator or "\n"

    calib, train = split_demos(cfg)

    writer = SummaryWriter(str(out_dir / "tb"))
    metrics_f = open(out_dir / "metrics.jsonl", "a")
    t0 = time.monotonic()

    def log(m: dict) -> None:
        m = {**m, "time_s": round(time.monotonic() - t0, 2)}
        metrics_f.write(json.dumps(m) + "\n")
        metrics_f.flush()
        tag = m["phase"]
        for k, v in m.items():
            if isinstance(v, float):
                writer.add_scalar(f"{tag}/{k}", v, m["step"])

    texts = [d.prompt for d in train] + [s for d in train for s in d.steps]
    policy, tokenizer = load_policy(cfg.model, texts, cfg.seed)
    timings = {}
    t = time.monotonic()
    sft_state = None
    if cfg.sft.minutes > 0 and cfg.sft.max_steps > 0:
        sft_state = train_sft(policy, tokenizer, train, cfg.sft, cfg.model.max_length, separator, log)
        timings["sft_steps"] = sft_state["steps"]
        with atomic_path(out_dir / SFT_STATE) as tmp:  # lets a later run go on with this SFT (the demo's baseline)
            torch.save(sft_state, tmp)
    timings["sft_s"] = round(time.monotonic() - t, 1)
    policy.eval()
    save_policy(policy, tokenizer, out_dir / "sft_policy")

    backbone = copy.deepcopy(policy)
    if cfg.reward.init == "random":
        backbone = type(policy)(policy.config)
    rm_cfg = reward_model_config(cfg.reward, separator, cfg.model.max_length)
    rm = RewardModel(backbone, tokenizer, rm_cfg)
    for p in policy.parameters():
        p.requires_grad_(False)
    t = time.monotonic()
    warm = (sft_state, cfg.sft.lr) if sft_state is not None and cfg.reward.init == "sft" else None
    timings["reward_steps"] = train_reward(rm, policy, train, cfg.reward, cfg.data.perturbations, log, warm)
    timings["reward_s"] = round(time.monotonic() - t, 1)

    cal_rows = calibration_rows(cfg, calib)
    calibrate_readout(rm, cal_rows, cfg.reward.readout_weights)
    rm.config.version = time.strftime("%Y%m%d-%H%M%S")
    rm.save_pretrained(out_dir / "reward_model")
    writer.close()
    metrics_f.close()
    summary = {"reward_model": str(out_dir / "reward_model"), "sft_policy": str(out_dir / "sft_policy"),
               "threshold": rm.config.threshold, "n_train": len(train), "n_calibration": len(cal_rows), **timings}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
