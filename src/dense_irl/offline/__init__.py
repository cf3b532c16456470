"""The offline IRL run (``dense-irl train-reward``): its config and its top-to-bottom program."""
