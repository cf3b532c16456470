"""Score the reward model and its baselines the same way, for localisation and Best-of-N.

Scorers (``ScoreFn``: chains -> one score per step, higher = better):
- ``reward_model``: the learned step rewards;
- ``policy_logprob``: the summed log-probability of each step under a policy (e.g. the SFT model);
- ``chance``: random scores (a floor: what any threshold on noise achieves).
Every scorer but the reward model gets its first-error threshold calibrated on the same held-out
chains; the reward model uses the threshold stored in its checkpoint unless calibration chains are given.
The model scorers carry their tokenizer and ``max_length`` (``localisation.with_layout``), so
:func:`compare_localisation` and :func:`compare_bon` count, for every scorer and before any of them runs, the
chains it will truncate (scored on the steps that fit, reported as ``n_truncated``).
"""

from __future__ import annotations

import random

from dense_irl.errors import ConfigError
from dense_irl.eval.bon import evaluate_bon
from dense_irl.eval.localisation import check_lengths, evaluate_localisation, with_layout
from dense_irl.models.chains import step_logprobs


def reward_model_scorer(rm, batch_size: int = 32):
    """ScoreFn of a :class:`~dense_irl.models.reward_model.RewardModel`: its step rewards."""
    return with_layout(lambda chains: [s.step_rewards for s in rm.score(chains, batch_size)], rm.tokenizer,
                       rm.config.max_length, rm.config.separator)


def logprob_scorer(policy_path: str, max_length: int = 256, separator: str = "\n", batch_size: int = 64):
    """ScoreFn of a causal LM folder: each step's summed log-probability."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_path)
    tok = AutoTokenizer.from_pretrained(policy_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model_logprob_scorer(model, tok, max_length, separator, batch_size)


def model_logprob_scorer(model, tokenizer, max_length: int = 256, separator: str = "\n", batch_size: int = 64):
    """ScoreFn of a loaded causal LM: each step's summed log-probability."""
    return with_layout(lambda chains: step_logprobs(model, tokenizer, chains, max_length, separator, batch_size),
                       tokenizer, max_length, separator)


def chance_scorer(seed: int = 0):
    """ScoreFn of pure noise."""
    rng = random.Random(seed)
    return lambda chains: [[rng.gauss(0, 1) for _ in steps] for _, steps in chains]


def _chains(rows: list[dict]) -> list[tuple[str, list[str]]]:
    return [(r["problem"], list(r["steps"])) for r in rows]


def compare_localisation(scorers: dict, rows: list[dict], calibration_rows: list[dict] | None,
                         rm_threshold: float | None = None, progress: bool = False) -> dict[str, dict]:
    """Localisation report per scorer; ``reward_model`` uses ``rm_threshold`` when one is given.

    Before any scorer runs, each one's truncated chains are counted (one note line per scorer that cuts
    any). ``progress``: a tqdm bar per scorer.
    """
    fixed = {name: rm_threshold if name == "reward_model" else None for name in scorers}
    for name in scorers:
        if fixed[name] is None and not calibration_rows:
            raise ConfigError(f"scorer '{name}' needs calibration chains to set its threshold (--calibration FILE)")
    for name, fn in scorers.items():
        sets = {"evaluated": _chains(rows)}
        if fixed[name] is None:
            sets["calibration"] = _chains(calibration_rows)
        check_lengths(fn, sets, name)
    return {name: evaluate_localisation(fn, rows, threshold=fixed[name],
                                        calibration_rows=None if fixed[name] is not None else calibration_rows,
                                        name=name, check=False, progress=name if progress else None)
            for name, fn in scorers.items()}


def compare_bon(scorers: dict, problems: list[dict], progress: bool = False) -> dict[str, dict]:
    """Best-of-N report per scorer (random pick, majority vote and oracle are in each report); truncated
    candidates are counted for every scorer before any runs."""
    chains = [(p["problem"], list(c["steps"])) for p in problems for c in p.get("candidates", [])]
    for name, fn in scorers.items():
        check_lengths(fn, {"candidate": chains}, name)
    return {name: evaluate_bon(fn, problems, name=name, check=False, progress=name if progress else None)
            for name, fn in scorers.items()}


def localisation_rows(reports: dict[str, dict]) -> list[dict]:
    """One table row per scorer: F1, accuracy on erroneous and on correct chains, the threshold, and the
    truncated chains (evaluated, calibration)."""
    return [{"scorer": name, "f1": r["f1"], "error_acc": r["error_acc"], "correct_acc": r["correct_acc"],
             "threshold": r["threshold"], "n_truncated": r.get("n_truncated"),
             "n_truncated_calibration": r.get("n_truncated_calibration")} for name, r in reports.items()]
