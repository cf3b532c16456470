"""Score the reward model and its baselines the same way, for localisation and Best-of-N.

Scorers (``ScoreFn``: chains -> one score per step, higher = better):
- ``reward_model``: the learned step rewards;
- ``policy_logprob``: the summed log-probability of each step under a policy (e.g. the SFT model);
- ``chance``: random scores (a floor: what any threshold on noise achieves).
Every scorer but the reward model gets its first-error threshold calibrated on the same held-out
chains; the reward model uses the threshold stored in its checkpoint unless calibration chains are given.
"""

from __future__ import annotations

import random

from dense_irl.errors import ConfigError
from dense_irl.eval.bon import evaluate_bon
from dense_irl.eval.localisation import evaluate_localisation
from dense_irl.models.chains import step_logprobs


def reward_model_scorer(rm, batch_size: int = 32):
    """ScoreFn of a :class:`~dense_irl.models.reward_model.RewardModel`: its step rewards."""
    return lambda chains: [s.step_rewards for s in rm.score(chains, batch_size)]


def logprob_scorer(policy_path: str, max_length: int = 256, separator: str = "\n"):
    """ScoreFn of a causal LM folder: each step's summed log-probability."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_path)
    tok = AutoTokenizer.from_pretrained(policy_path)
    return lambda chains: step_logprobs(model, tok, chains, max_length, separator)


def chance_scorer(seed: int = 0):
    """ScoreFn of pure noise."""
    rng = random.Random(seed)
    return lambda chains: [[rng.gauss(0, 1) for _ in steps] for _, steps in chains]


def compare_localisation(scorers: dict, rows: list[dict], calibration_rows: list[dict] | None,
                         rm_threshold: float | None = None) -> dict[str, dict]:
    """Localisation report per scorer; ``reward_model`` uses ``rm_threshold`` when one is given."""
    out = {}
    for name, fn in scorers.items():
        fixed = rm_threshold if name == "reward_model" else None
        if fixed is None and not calibration_rows:
            raise ConfigError(f"scorer '{name}' needs calibration chains to set its threshold (--calibration FILE)")
        out[name] = evaluate_localisation(fn, rows, threshold=fixed,
                                          calibration_rows=None if fixed is not None else calibration_rows)
    return out


def compare_bon(scorers: dict, problems: list[dict]) -> dict[str, dict]:
    """Best-of-N report per scorer (random pick, majority vote and oracle are in each report)."""
    return {name: evaluate_bon(fn, problems) for name, fn in scorers.items()}


def localisation_rows(reports: dict[str, dict]) -> list[dict]:
    """One table row per scorer: F1, accuracy on erroneous and on correct chains, the threshold."""
    return [{"scorer": name, "f1": r["f1"], "error_acc": r["error_acc"], "correct_acc": r["correct_acc"],
             "threshold": r["threshold"]} for name, r in reports.items()]
