"""The IRL algorithm, pure torch and no Ray: every program (offline run, online loop, demos) calls these.

    config.py      SFTConfig, RewardConfig, RLConfig (defaults are the shipped recipe)
    batches.py     typed messages: Rollout, Negative, RewardBatch, Experience
    experience.py  the demonstrations' split and order; perturbed and policy negatives
    losses.py      every loss: SFT / expert NLL, the AIRL discriminator, the iq terms, PPO-clip + KL + ptx
    advantages.py  step rewards -> advantages (a registry: group, tree), the outcome term
    optim.py       the one optimiser step (AdamW, clipping, warm-up)
    sft.py         the one SFT loop and step budgets
"""
