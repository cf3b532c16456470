"""Adapters that bring dense-irl step rewards to other trainers: OpenRLHF (openrlhf_reward) and verl (verl)."""
