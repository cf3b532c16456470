"""Sampling chains from a policy, without Ray: the rollout engines (``engines.py``: RolloutConfig, HFEngine,
VLLMEngine), run by the loop's rollout actors, ``dense-irl search`` and the scoring server's search."""
