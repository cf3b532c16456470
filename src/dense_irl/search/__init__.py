"""Reward-guided search at test time: the step reward model picks among a policy's samples.

    config.py       SearchConfig (the algorithm; the body of POST /v1/search), SearchJobConfig (dense-irl search)
    step_search.py  Best-of-N reranking and step-level beam search over a rollout engine and a scorer
    run.py          dense-irl search: a file of prompts in, one JSONL row per prompt out, accuracy vs majority
"""
