"""Benchmark (not a test): which reward heads on a frozen backbone's states pick well in Best-of-4.

    python bench/frozen_probe.py cache --run RUN_DIR [--experts 360] [--questions 450] [--keep-layers 8,12,16,20,24,30]
        [--cache FILE]
    python bench/frozen_probe.py train [--cache FILE] [--layers 20] [--negatives all|perturbed|policy]
        [--task-weight 0] [--tower 0] [--tower-lr 1e-4] [--steps 900] [--lr 2e-3] [--batch 32] [--seed 0]
        [--out bench/results/frozen_probe.jsonl]

``cache`` runs ``RUN_DIR``'s frozen SFT policy (what ``dense-irl train-reward`` wrote with a frozen reward
backbone) once over the first ``--experts`` pool experts with the negatives the reward phase trains on (4
perturbed experts each, cut after their divergent step as ``algo.losses.loss_chains`` cuts them, and the kept
SFT-policy continuations of ``policy_negatives.jsonl``) and over the candidates of the first ``--questions``
questions of ``example_model_solutions.jsonl``. It keeps the hidden states of ``--keep-layers`` (8, 12, 16, 20, 24 and
30) and the token log-probs (fp16; ~4.7 GB for the defaults, ~25 minutes on 2 cores).

``train`` fits one variant of the project's heads on that cache (``RewardModel.rewards``: g, h and the token
temperature on standardised states, the logit readout; ``algo.losses.level_bce`` with the run's label
smoothing and ``negative_loss_mask``), ``--steps`` steps of ``--batch`` experts with one negative each, lr
with warm-up and cosine decay, in about 100 s. ``--layers 12,20,30`` concatenates layers; ``--tower N``
trains copies of the N decoder layers above the first of ``--layers`` with the heads (on 2 CPU cores ~30 s a
step for 4 layers). It reports Best-of-4 (mean, min, sum, last; majority vote with its ties broken by the
heads) on the dev questions 300.. and the test questions 0..299 (the ones ``bench/real_data.py --n-bon 300``
reports), against random pick, majority vote and oracle, and appends one JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BON = ROOT.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
LAYERS = "8,12,16,20,24,30"  # the hidden states `cache` keeps (SmolLM2-135M has 30 layers)
N_TEST = 300  # Best-of-4's test questions come first; the rest are the dev questions


def cache(args) -> None:
    """Run the frozen backbone once over the train families and the Best-of-4 candidates; save the states."""
    from tqdm import tqdm

    from dense_irl.algo.batches import Negative, RewardBatch
    from dense_irl.algo.experience import perturbed_negatives, shared_prefix, split_demos
    from dense_irl.algo.losses import loss_chains
    from dense_irl.config import load_config
    from dense_irl.data.demos import load_data
    from dense_irl.data.layout import encode_chains
    from dense_irl.eval.bon import load_bon
    from dense_irl.io import atomic_path
    from dense_irl.models.chains import token_logprobs
    from dense_irl.models.reward_model import RewardModel
    from dense_irl.offline.config import TrainRewardConfig

    run = Path(args.run)
    cfg = load_config(TrainRewardConfig, run / "config.yaml")
    _, train = split_demos(load_data(cfg.data), cfg.data.calibration_chains, cfg.seed)
    rm = RewardModel.from_pretrained(run / "reward_model")
    keep = [int(x) for x in args.keep_layers.split(",")]
    n_layers = rm.backbone.config.num_hidden_layers
    if any(not 0 <= k <= n_layers for k in keep):
        raise SystemExit(f"--keep-layers {args.keep_layers}: the backbone's hidden states are numbered 0..{n_layers}")
    continuations: dict[str, list[dict]] = {}
    if (run / "policy_negatives.jsonl").is_file():
        for line in (run / "policy_negatives.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["kept"]:
                continuations.setdefault(row["id"], []).append(row)
    rng = random.Random(1)
    families = []
    for d in train[: args.experts]:
        negs = [n for _ in range(4) for n in perturbed_negatives([d], cfg.data.perturbations, rng)]
        negs += [Negative(d.prompt, r["steps"], shared_prefix(r["steps"], d.steps), label_all=True,
                          finished=r["finished"]) for r in continuations.get(d.id, [])]
        chains, finished = loss_chains(RewardBatch([(d.prompt, d.steps)], negs), cfg.reward)
        families.append({"chains": chains, "finished": finished, "shared": [0] + [n.shared for n in negs],
                         "label_all": [False] + [n.label_all for n in negs],
                         "kind": ["expert"] + ["policy" if n.label_all else "perturbed" for n in negs]})
    problems = load_bon(args.bon)[: args.questions]
    chains = [(c, f) for fam in families for c, f in zip(fam["chains"], fam["finished"])]
    n_train = len(chains)
    chains += [((p["problem"], list(c["steps"])), True) for p in problems for c in p["candidates"]]
    enc = encode_chains(rm.tokenizer, [c for c, _ in chains], rm.config.max_length, rm.config.separator,
                        [f for _, f in chains])
    lengths = enc.attention_mask.sum(1).tolist()
    order = sorted(range(len(chains)), key=lambda j: -lengths[j])
    feats: list[dict | None] = [None] * len(chains)
    with torch.no_grad(), tqdm(total=sum(lengths), desc="frozen states", unit="tok", unit_scale=True) as bar:
        i = 0
        while i < len(order):
            rows = order[i : i + max(1, 2048 // lengths[order[i]])]
            i += len(rows)
            T = lengths[rows[0]]
            ids = enc.input_ids[rows, :T]
            out = rm.backbone(input_ids=ids, attention_mask=enc.attention_mask[rows, :T], output_hidden_states=True)
            logp = token_logprobs(out.logits, ids)
            for j, r in enumerate(rows):
                n = lengths[r]
                feats[r] = {"h": torch.stack([out.hidden_states[k][j, :n] for k in keep]).half(),
                            "lp": logp[j, :n].float()}
            bar.update(sum(lengths[r] for r in rows))
    with atomic_path(Path(args.cache)) as tmp:
        torch.save({"run": str(run), "layers": keep, "families": families, "problems": problems, "chains": chains,
                    "feats": feats, "n_train": n_train}, tmp)


def train(args) -> None:
    """Fit one heads variant on the cache and report its Best-of-4 on the dev and test questions."""
    from dense_irl.algo.losses import level_bce, negative_loss_mask
    from dense_irl.algo.microbatch import select_rows
    from dense_irl.config import load_config
    from dense_irl.data.layout import encode_chains
    from dense_irl.eval.bon import evaluate_bon
    from dense_irl.models.reward_model import RewardModel
    from dense_irl.offline.config import TrainRewardConfig

    torch.manual_seed(args.seed)
    C = torch.load(args.cache, weights_only=False)
    families, problems, chains, feats, n_train = (C[k] for k in ("families", "problems", "chains", "feats", "n_train"))
    cfg = load_config(TrainRewardConfig, Path(C["run"]) / "config.yaml").reward
    rm = RewardModel.from_pretrained(Path(C["run"]) / "reward_model")
    rm.config.token_temperature = True
    enc_all = encode_chains(rm.tokenizer, [c for c, _ in chains], rm.config.max_length, rm.config.separator,
                            [f for _, f in chains])
    lengths = enc_all.attention_mask.sum(1).tolist()
    missing = [x for x in args.layers.split(",") if int(x) not in C["layers"]]
    if missing:
        raise SystemExit(f"--layers {args.layers}: the cache keeps layers {C['layers']} only")
    layers = [C["layers"].index(int(x)) for x in args.layers.split(",")]
    H = rm.backbone.config.hidden_size
    D = H if args.tower else H * len(layers)
    # fresh heads for D inputs (the checkpoint's own are discarded): RewardModel.rewards reads only these
    for name in ("g_head", "h_head", "t_head"):
        head = nn.Linear(D, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        setattr(rm, name, head)
    rm.head_shift, rm.head_scale = torch.zeros(D), torch.ones(D)
    tower = None
    if args.tower:
        from transformers.masking_utils import create_causal_mask

        first = C["layers"][layers[0]]  # hidden_states[first] is the input of decoder layer `first`
        if first + args.tower > rm.backbone.config.num_hidden_layers:
            raise SystemExit(f"--tower {args.tower} above layer {first}: the backbone has "
                             f"{rm.backbone.config.num_hidden_layers} layers")
        tower = nn.ModuleList([copy.deepcopy(rm.backbone.model.layers[first + k]) for k in range(args.tower)]).float()

    def features(rows):
        enc = select_rows(enc_all, rows)
        B, T = enc.input_ids.shape
        hid, logp = torch.zeros(B, T, H * (1 if tower else len(layers))), torch.zeros(B, T)
        for j, r in enumerate(rows):
            n, f = lengths[r], feats[r]
            hid[j, :n] = (f["h"][layers[0]] if tower else torch.cat([f["h"][k] for k in layers], -1)).float()
            logp[j, :n] = f["lp"]
        if tower is not None:
            pos = torch.arange(T)[None].expand(B, -1)
            mask = create_causal_mask(config=rm.backbone.config, inputs_embeds=hid, attention_mask=enc.attention_mask,
                                      cache=None, position_ids=pos)
            rope = rm.backbone.model.rotary_emb(hid, position_ids=pos)
            for layer in tower:
                hid = layer(hid, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        return enc, hid, logp

    offsets = np.cumsum([0] + [len(f["chains"]) for f in families]).tolist()
    negs = [[k for k in range(1, len(f["chains"])) if args.negatives in ("all", f["kind"][k])] for f in families]
    experts = [i for i in range(len(families)) if negs[i]]
    with torch.no_grad():  # the heads' standardisation, from expert step tokens
        hs = []
        for i in experts[:200]:
            enc, hid, _ = features([offsets[i]])
            hs.append(hid[0][enc.step_ids[0] >= 0])
        hs = torch.cat(hs)
        rm.head_shift, rm.head_scale = hs.mean(0), hs.std(0).clamp(min=1e-3)
    groups = [{"params": [p for n in ("g_head", "h_head", "t_head") for p in getattr(rm, n).parameters()],
               "lr": args.lr}]
    if tower is not None:
        groups.append({"params": list(tower.parameters()), "lr": args.tower_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    rng, t0 = random.Random(args.seed), time.monotonic()
    for step in range(args.steps):
        w = min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * w
        picked = rng.sample(experts, min(args.batch, len(experts)))
        ks = [rng.choice(negs[i]) for i in picked]
        enc, hid, logp = features([offsets[i] for i in picked] + [offsets[i] + k for i, k in zip(picked, ks)])
        out = rm.rewards(enc, hid, logp)
        mask = negative_loss_mask(enc.step_mask, len(picked), [families[i]["shared"][k] for i, k in zip(picked, ks)],
                                  cfg, [families[i]["label_all"][k] for i, k in zip(picked, ks)])
        loss = level_bce(out["step_scores"], mask, torch.tensor([1.0] * len(picked) + [0.0] * len(picked)),
                         cfg.label_smoothing, {"step": 1.0, "task": args.task_weight}, cfg.paragraph_steps)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.monotonic() - t0
    scores: dict[tuple, list[float]] = {}  # (prompt, steps) -> step scores: eval.bon's ScoreFn reads them
    with torch.no_grad():
        order = sorted(range(n_train, len(chains)), key=lambda r: lengths[r])
        for i in range(0, len(order), 16):
            rows = order[i : i + 16]
            enc, hid, logp = features(rows)
            s = rm.rewards(enc, hid, logp)["step_scores"]
            for j, r in enumerate(rows):
                prompt, steps = chains[r][0]
                scores[(prompt, tuple(steps))] = s[j, : enc.n_steps[j]].tolist()
    report = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "train_s": round(train_s, 1),
              "final_loss": round(float(loss.detach()), 4)}
    for split, qs in (("test", problems[:N_TEST]), ("dev", problems[N_TEST:])):
        report[split] = {"questions": len(qs)}
        if qs:
            bon = evaluate_bon(lambda batch: [scores[(p, tuple(st))] for p, st in batch], qs,
                               aggregations=("mean", "min", "sum", "last"), check=False)
            report[split] |= {k: round(v, 3) for k, v in bon["accuracy"].items()}
    print(json.dumps(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(report) + "\n")


def main() -> None:
    from dense_irl.logs import quiet

    quiet(False)  # one bar per phase, not transformers' per-file loading bars
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(required=True)
    c = sub.add_parser("cache")
    c.add_argument("--run", required=True)
    c.add_argument("--experts", type=int, default=360)
    c.add_argument("--questions", type=int, default=450)
    c.add_argument("--bon", default=str(BON))
    c.add_argument("--keep-layers", default=LAYERS)
    c.add_argument("--cache", default="/tmp/frozen_probe.pt")
    c.set_defaults(func=cache)
    t = sub.add_parser("train")
    t.add_argument("--cache", default="/tmp/frozen_probe.pt")
    t.add_argument("--layers", default="20")
    t.add_argument("--negatives", choices=("all", "perturbed", "policy"), default="all")
    t.add_argument("--task-weight", type=float, default=0.0)
    t.add_argument("--tower", type=int, default=0)
    t.add_argument("--tower-lr", type=float, default=1e-4)
    t.add_argument("--steps", type=int, default=900)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=str(ROOT / "bench" / "results" / "frozen_probe.jsonl"))
    t.set_defaults(func=train)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
