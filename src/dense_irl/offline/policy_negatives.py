"""The policy's own mistakes as negatives of the offline run: continuations of expert prefixes.

Perturbed experts teach the reward model the errors the perturbations inject; the errors a model makes are
others (a wrong operation, a number from nowhere, an answer before its computation). AIRL's negatives are the
policy's samples. Offline there is no policy loop, but there is the SFT policy: for each expert of the reward
phase's pool it continues the expert's first ``k`` steps (``k`` drawn uniformly, 0 included: from the prompt
alone) to the end, and with ``reward.policy_negatives_keep: incorrect`` a continuation is kept when the
outcome verifier (``data.answers.is_correct``) rejects its final answer. A kept continuation leaves the expert
at step ``k`` or later, and every step from there on is the policy's, so each counts as a negative
(``Negative.label_all``); or, with ``reward.policy_negatives_label: first_error``, only its first step that
states a result found neither in the question nor in the expert's solution, or whose notes' arithmetic is
wrong (``data.calc_notes.first_unsupported_step``; its last step when none is), read as a perturbed expert's
divergent step is: the steps before it count as right (``Negative.shared``), the steps after it not at all.

The samples are written to ``policy_negatives.jsonl`` in the run's folder (one row per continuation, kept or
not), atomically, so a run can be read back and checked by eye.
"""

from __future__ import annotations

import random
import time

from dense_irl.algo.batches import Negative
from dense_irl.algo.experience import shared_prefix
from dense_irl.data.answers import is_correct
from dense_irl.data.calc_notes import first_unsupported_step
from dense_irl.data.schema import Demonstration
from dense_irl.io import write_jsonl
from dense_irl.sampling.engines import HFEngine, RolloutConfig

FILE = "policy_negatives.jsonl"


def sample_policy_negatives(policy_path: str, demos: list[Demonstration], experts: list[int], cfg, separator: str,
                            out_path, seed: int = 0, device: str = "cpu") -> tuple[dict[int, list[Negative]], dict]:
    """``cfg.policy_negatives`` continuations of each expert ``demos[i]`` (``i`` in ``experts``) by the policy
    at ``policy_path`` (``cfg``: the offline reward config); returns the kept negatives per expert and a
    summary (sampled, kept, correct, finished, tokens, seconds). Sampling runs longest prefix first, in
    batches of ``cfg.policy_batch_size``, with a progress bar."""
    from tqdm import tqdm

    rng = random.Random(seed + 11)
    jobs = [(i, rng.randrange(len(demos[i].steps))) for i in experts for _ in range(cfg.policy_negatives)]
    # one cut per job: k expert steps kept (0 .. n-1), so the policy writes at least the last step itself
    jobs.sort(key=lambda j: -sum(len(s) for s in demos[j[0]].steps[: j[1]]))
    engine = HFEngine(policy_path, seed, device=device)
    rollout = RolloutConfig(temperature=cfg.policy_temperature, top_p=1.0, max_new_tokens=cfg.policy_max_new_tokens,
                            batch_size=cfg.policy_batch_size)
    kept: dict[int, list[Negative]] = {}
    rows, stats, t0 = [], {"sampled": 0, "kept": 0, "correct": 0, "finished": 0, "tokens": 0}, time.monotonic()
    with tqdm(total=len(jobs), desc="policy negatives", unit="chain", mininterval=2) as bar:
        for start in range(0, len(jobs), cfg.policy_batch_size):
            chunk = jobs[start : start + cfg.policy_batch_size]
            out = engine.continue_chains([(demos[i].prompt, demos[i].steps[:k]) for i, k in chunk], 1, rollout,
                                         separator, seed=seed + start)
            for (i, k), [r] in zip(chunk, out):
                demo = demos[i]
                steps = demo.steps[:k] + r.steps
                correct = is_correct(demo, separator.join(steps)) if r.finished else False
                keep = bool(r.steps) and steps != demo.steps and (cfg.policy_negatives_keep == "all" or not correct)
                shared = shared_prefix(steps, demo.steps)
                first_error = None
                if cfg.policy_negatives_label == "first_error" and keep:
                    first_error = first_unsupported_step(demo.prompt, demo.steps, steps, shared)
                    first_error = len(steps) - 1 if first_error is None else first_error
                if keep:
                    kept.setdefault(i, []).append(
                        Negative(demo.prompt, steps, shared, label_all=True, finished=r.finished) if first_error is None
                        else Negative(demo.prompt, steps, first_error, finished=r.finished))
                stats["sampled"] += 1
                stats["kept"] += keep
                stats["correct"] += correct
                stats["finished"] += r.finished
                stats["tokens"] += len(r.token_ids)
                rows.append({"id": demo.id, "prompt": demo.prompt, "expert_steps_kept": k, "steps": steps,
                             "finished": r.finished, "correct": correct, "kept": keep, "first_error": first_error})
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{stats['tokens'] / max(1e-9, time.monotonic() - t0):.0f}", refresh=False)
    del engine
    stats["seconds"] = round(time.monotonic() - t0, 1)
    write_jsonl(out_path, rows)
    return kept, stats
