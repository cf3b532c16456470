"""dense-irl: dense, step-level reasoning reward models learned by inverse RL."""

__version__ = "0.1.0"
