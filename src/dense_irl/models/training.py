"""What of a model trains, and how: LoRA adapters (peft), the top layers only, gradient checkpointing, bf16.

A trained model is saved for serving as one plain HF folder with the adapters merged in (rollout engines,
vLLM, the scoring app and ``from_pretrained`` read it unchanged), plus, when adapters were trained, the
adapters alone under ``adapter/`` (peft's layout, naming the folder they sit on), from which training goes
on exactly: :func:`load_trainable`.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from dense_irl.errors import CheckpointError, ConfigError

ADAPTER_DIR = "adapter"


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (Llama, Qwen2, Mistral, GPT-2 layouts)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = base
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise CheckpointError(f"cannot find the decoder layers of {type(base).__name__} (for model.trainable_layers)")


def is_adapted(model) -> bool:
    """True for a peft model (LoRA adapters on a frozen base)."""
    return hasattr(model, "peft_config")


def prepare_for_training(model, cfg):
    """Apply ``cfg`` (a ``ModelConfig``): LoRA on the top ``trainable_layers`` (all when 0) or, without LoRA,
    freeze all but the top ``trainable_layers``; then gradient checkpointing. Returns the model to train."""
    layers = decoder_layers(model) if cfg.trainable_layers else None
    if layers is not None and cfg.trainable_layers > len(layers):
        raise ConfigError(f"model.trainable_layers is {cfg.trainable_layers} but the model has {len(layers)} decoder "
                          "layers (0 trains all)")
    top = list(range(len(layers)))[-cfg.trainable_layers :] if layers is not None else None
    if cfg.lora_r > 0 and not is_adapted(model):
        from peft import LoraConfig, get_peft_model

        if cfg.lora_targets != "all-linear":
            targets = [t.strip() for t in cfg.lora_targets.split(",")]
        elif top is None:
            targets = "all-linear"
        else:  # peft takes a layer subset only with module names: every linear layer of a decoder block
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules()
                              if isinstance(m, torch.nn.Linear)})
            if not targets:
                raise ConfigError(f"model.trainable_layers with LoRA: no torch.nn.Linear in the decoder layers of "
                                  f"{type(model).__name__}; name the modules in model.lora_targets")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets, layers_to_transform=top))
    elif cfg.lora_r == 0 and top is not None:
        model.requires_grad_(False)
        for i in top:
            layers[i].requires_grad_(True)
        norm = getattr(getattr(model, "model", None), "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if top is not None and hasattr(model, "disable_input_require_grads"):
            # non-reentrant checkpoints need no grad at the inputs: keep the backward above the frozen layers
            model.disable_input_require_grads()
        model.config.use_cache = False
    return model


def merged(model):
    """A plain HF model with the adapters merged in (``model`` itself when it has none)."""
    if not is_adapted(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The serving weights of ``model`` (adapters merged), on CPU."""
    return {k: v.detach().cpu().clone() for k, v in merged(model).state_dict().items()}


def save_model(model, folder: Path) -> None:
    """Write ``model`` into ``folder`` (inside an atomic write): merged weights, plus ``adapter/``."""
    merged(model).save_pretrained(folder, safe_serialization=True)
    if is_adapted(model):
        model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)


def load_trainable(path: str | Path, cfg):
    """The model to go on training from ``path``: base + the saved adapters when ``path/adapter`` exists (the
    very parameters that trained), else the folder's weights prepared by :func:`prepare_for_training`."""
    from dense_irl.models.hf_files import load_causal_lm

    path = Path(path)
    adapter = path / ADAPTER_DIR
    if cfg.lora_r > 0 and (adapter / "adapter_config.json").is_file():
        import json

        from peft import PeftModel

        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not (Path(base) / "config.json").is_file():
            raise CheckpointError(f"{adapter}: its base model folder {base!r} is gone; the merged weights in {path} "
                                  "still serve, and training can start fresh adapters from them (delete adapter/)")
        model = PeftModel.from_pretrained(load_causal_lm(base, "adapters' base model"), adapter, is_trainable=True)
        return prepare_for_training(model, cfg)
    return prepare_for_training(load_causal_lm(path, "policy"), cfg)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when this process has a GPU, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``auto``: bf16 on CUDA, none on CPU, where bf16
    matmuls measured 500x slower than fp32 on the reference machine)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The autocast context of :func:`autocast_dtype` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in GB: ``host_rss`` (resident set) and, on CUDA, ``cuda`` (the most
    torch's allocator held for tensors on ``device``)."""
    import resource

    peak = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}  # Linux: KB
    if device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return peak
