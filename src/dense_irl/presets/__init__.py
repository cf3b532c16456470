"""The shipped presets (YAML recipes), package data: ``dense-irl train --config demo_online``."""
