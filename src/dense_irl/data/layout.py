"""The chain layout: how a reasoning chain is split into steps and laid out as token ids, in one place.

A chain is ``(prompt, steps)``. Its token layout is

    <s> prompt SEP | step_0 SEP | step_1 SEP | ... | step_last </s>

where ``|`` marks span boundaries: a step's span is its own tokens plus the separator (or ``</s>``) that
closes it, because "this step ends here" is part of the step (``12 + 5 = 1`` and ``12 + 5 = 17`` differ
only in where the step stops). Each piece is tokenised on its own and the ids concatenated, so spans are
exact for any tokenizer, and :func:`prompt_ids` is the head every path shares: the ids a rollout continues
from are the ids SFT, the reward model, PPO and the scoring server see. Tokenising ``prompt + SEP`` in one
piece would not do: Qwen2 / Llama-3 pre-tokenizers merge punctuation with a following newline (``"?\n"``
is one token), so the ids would depend on how the text was cut. A prompt given with its separator already
appended (as text-level clients send it) is the same chain: trailing separators are the boundary, not
prompt text. Truncation drops whole steps from the end and says how many were kept: labels are cut with
the tokens, never shifted. With ``model.chat_template: true`` the head ``<s> prompt SEP`` is the tokenizer's
chat template for one user turn (``chat_prompt_ids``), flagged in the tokenizer's saved config so that
every path that loads the tokenizer applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Chain = tuple[str, list[str]]


def split_steps(text: str, separator: str) -> list[str]:
    """A solution text's steps: split on ``separator``, each stripped, blank pieces dropped."""
    return [s.strip() for s in text.split(separator) if s.strip()]


@dataclass(frozen=True)
class ChainLayout:
    """What fixes a chain's token layout besides the tokenizer."""

    separator: str = "\n"
    max_length: int = 256


@dataclass
class EncodedBatch:
    """A padded batch of chains with each step's token span."""

    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    step_ids: torch.Tensor  # (B, T) index of the step each token belongs to, -1 for prompt and padding
    step_start: torch.Tensor  # (B, S) first token position of each step (0 where absent)
    step_end: torch.Tensor  # (B, S) last token position of each step (0 where absent)
    step_mask: torch.Tensor  # (B, S) True where the step exists (was not truncated)
    n_steps: list[int]  # steps kept per chain
    n_steps_given: list[int]  # steps given per chain
    partial: list[bool] | None = None  # True where more steps follow the chain's last (a search's partial chain)

    def to(self, device) -> EncodedBatch:
        """The same batch with its tensors on ``device`` (the lists stay as they are)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return EncodedBatch(**moved)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _special(tokenizer, name: str) -> list[int]:
    tid = getattr(tokenizer, f"{name}_token_id")
    return [tid] if tid is not None else []


def _strip_separators(text: str, separator: str) -> str:
    while separator and text.endswith(separator):
        text = text[: -len(separator)]
    return text


def prompt_ids(tokenizer, prompt: str, separator: str) -> list[int]:
    """The token ids a chain's steps follow: ``<s> prompt SEP``, prompt and separator tokenised apart.

    Separators that end ``prompt`` are dropped first: ``prompt + SEP`` is the same chain head as ``prompt``.
    """
    if uses_chat_template(tokenizer):
        return chat_prompt_ids(tokenizer, _strip_separators(prompt, separator))
    head = _ids(tokenizer, _strip_separators(prompt, separator))
    return _special(tokenizer, "bos") + head + _ids(tokenizer, separator)


CHAT_FLAG = "dense_irl_chat_template"  # saved in tokenizer_config.json: every path that loads the tokenizer sees it


def uses_chat_template(tokenizer) -> bool:
    """True when the chain head is the tokenizer's chat template (``model.chat_template: true``)."""
    return bool(getattr(tokenizer, "init_kwargs", {}).get(CHAT_FLAG))


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat template's head for one user turn, up to the assistant's turn (the steps follow it)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _step_pieces(tokenizer, steps: list[str], separator: str, finished: bool = True) -> list[list[int]]:
    """Each step's ids and its closing ``SEP`` (``</s>`` for the last of a ``finished`` chain), tokenised apart."""
    sep, eos = _ids(tokenizer, separator), _special(tokenizer, "eos")
    return [_ids(tokenizer, step) + (eos if finished and k == len(steps) - 1 else sep) for k, step in enumerate(steps)]


def prefix_ids(tokenizer, prompt: str, steps: list[str], separator: str) -> list[int]:
    """The ids a chain continues from after ``steps``: ``<s> prompt SEP step_0 SEP ... step_k SEP``.

    The next step a policy samples from here lands exactly where :func:`encode_chains` puts it (step search
    expands partial chains from these ids)."""
    pieces = _step_pieces(tokenizer, steps, separator, finished=False)
    return prompt_ids(tokenizer, prompt, separator) + [t for piece in pieces for t in piece]


def chain_length(tokenizer, chain: Chain, separator: str) -> int:
    """How many tokens the layout gives ``chain`` before any truncation (a limit on requests counts these)."""
    prompt, steps = chain
    pieces = _step_pieces(tokenizer, steps, separator)
    return len(prompt_ids(tokenizer, prompt, separator)) + sum(map(len, pieces))


def encode_chains(tokenizer, chains: list[Chain], max_length: int, separator: str = "\n",
                  finished: list[bool] | None = None) -> EncodedBatch:
    """Tokenise ``chains`` into one padded batch; see the module docstring for the layout.

    ``finished[b]`` False: chain ``b`` is a partial chain (more steps to come), so its last step is closed by
    ``SEP``, not ``</s>`` (a step search scores partial chains; default: every chain is finished)."""
    if not chains:
        raise ValueError("encode_chains got no chains")
    if finished is not None and len(finished) != len(chains):
        raise ValueError(f"encode_chains got {len(finished)} finished flags for {len(chains)} chains")
    bos = _special(tokenizer, "bos")
    rows, spans_all = [], []
    for b, (prompt, steps) in enumerate(chains):
        ids = prompt_ids(tokenizer, prompt, separator)
        pieces = _step_pieces(tokenizer, steps, separator, True if finished is None else finished[b])
        # An over-long prompt loses its beginning (not its steps) so the first step still fits.
        room = max_length - min(len(pieces[0]) if pieces else 0, max_length // 2)
        if len(ids) > room:
            ids = bos + ids[len(ids) - room + len(bos) :]
        spans = []
        for piece in pieces:
            if len(ids) + len(piece) > max_length:
                break
            spans.append((len(ids), len(ids) + len(piece) - 1))
            ids = ids + piece
        rows.append(ids)
        spans_all.append(spans)
    B, T = len(rows), max(len(r) for r in rows)
    S = max(1, max(len(s) for s in spans_all))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    step_ids = torch.full((B, T), -1, dtype=torch.long)
    step_start = torch.zeros((B, S), dtype=torch.long)
    step_end = torch.zeros((B, S), dtype=torch.long)
    step_mask = torch.zeros((B, S), dtype=torch.bool)
    for b, (ids, spans) in enumerate(zip(rows, spans_all)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        for k, (s, e) in enumerate(spans):
            step_ids[b, s : e + 1] = k
            step_start[b, k], step_end[b, k], step_mask[b, k] = s, e, True
    return EncodedBatch(
        input_ids, attention_mask, step_ids, step_start, step_end, step_mask,
        [len(s) for s in spans_all], [len(c[1]) for c in chains],
        None if finished is None else [not f for f in finished],
    )


def token_steps(tokenizer, token_ids: list[int], separator: str) -> list[int]:
    """The step index of every sampled completion token (steps as :func:`split_steps` counts them).

    A token belongs to the piece of text it starts in; blank pieces are not steps, so their tokens
    (and the closing ``</s>``) go to the nearest step before them (the first step if none).
    """
    piece_of_token = [tokenizer.decode(token_ids[:t], skip_special_tokens=True).count(separator)
                      for t in range(len(token_ids))]
    pieces = tokenizer.decode(token_ids, skip_special_tokens=True).split(separator)
    step_of_piece, k = [], -1
    for p in pieces:
        if p.strip():
            k += 1
        step_of_piece.append(max(k, 0))
    return [step_of_piece[min(p, len(step_of_piece) - 1)] for p in piece_of_token]


def sum_by_step(token_values: torch.Tensor, step_ids: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Sum per-token values (B, T) into per-step totals (B, n_steps); tokens with step id -1 are dropped."""
    B = token_values.shape[0]
    idx = step_ids.clamp(min=0)
    vals = token_values * (step_ids >= 0).to(token_values.dtype)
    out = torch.zeros(B, n_steps, dtype=token_values.dtype, device=token_values.device)
    return out.scatter_add(1, idx, vals)
