"""Adapters that bring dense-irl step rewards to other trainers (OpenRLHF; verl to come)."""
