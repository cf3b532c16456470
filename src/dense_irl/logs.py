"""Quiet output by default: one progress bar per phase, and the libraries' own chatter off.

``dense-irl --verbose`` brings back Ray's forwarding of worker output (with its dedup notices),
transformers' per-file "Loading weights" bars and warnings, and DeepSpeed's notices. The choice travels to
Ray workers started later through the environment (:data:`VERBOSE_ENV`).
"""

from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "DENSE_IRL_VERBOSE"


def is_verbose() -> bool:
    """Whether the libraries' own output was asked for (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def quiet(verbose: bool = False) -> None:
    """Set the process (and the local Ray workers it starts, which inherit its environment) quiet, unless
    ``verbose``. Call before transformers is imported and before ``ray.init``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # (no torch import here: this runs at every CLI start, `dense-irl score` included)
    if not os.path.exists("/dev/nvidiactl") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        # DeepSpeed's accelerator auto-detection warns on every process that imports it (transformers does,
        # through accelerate); naming the CPU accelerator skips the detection.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.setdefault(VERBOSE_ENV, "0")
    # huggingface_hub reads this at import: transformers' per-file "Loading weights" / "Writing shards" bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # peft reads transformers' old name for the checkpointing flag on every LoRA model (transformers >= 5.2x
    # warns on each read): a library notice, not the user's to act on.
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    tf = sys.modules.get("transformers")  # already imported: its flags were read, set them directly
    if tf is not None:
        tf.utils.logging.disable_progress_bar()
        tf.utils.logging.set_verbosity_error()


def ray_init_kwargs() -> dict:
    """``ray.init`` options: no dashboard; worker output forwarded to the driver only when verbose (errors
    raised in actors still reach the driver as exceptions)."""
    verbose = is_verbose()
    return {"include_dashboard": False, "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.WARNING}
