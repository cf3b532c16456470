"""Dense step rewards placed on a trainer's response tokens, framework-free (verl's reward manager uses it).

A trainer holds each rollout as prompt token ids and response token ids. The response is decoded, split into
steps on the reward model's separator, scored (one reward per step), and each step's reward goes onto the
step's last response token (``place: last``, what a per-token advantage estimator such as GAE or
REINFORCE++ credits to the step) or is spread evenly over the step's tokens (``place: spread``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dense_irl.serving.vllm_api import chat_turns

Chain = tuple[str, list[str]]
PLACES = ("last", "spread")


def prompt_text(tokenizer, prompt_ids: list[int]) -> str:
    """The problem a chat-templated (or plain) prompt asks: the last user turn, or the plain decoded text."""
    chat = chat_turns(tokenizer.decode(prompt_ids, skip_special_tokens=False))  # it ends with the assistant turn
    return chat[0] if chat is not None else tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()


def step_end_tokens(tokenizer, response_ids: list[int], separator: str) -> tuple[list[str], list[int]]:
    """``(steps, index of each step's last token)`` of a response, from the characters its token prefixes
    decode to (a binary search per step: O(steps x log tokens) decodes, not one per token)."""
    def decoded_len(j: int) -> int:  # characters the first j + 1 tokens decode to (non-decreasing in j)
        return len(tokenizer.decode(response_ids[: j + 1], skip_special_tokens=True))

    def last_token(char: int) -> int:  # the first token whose prefix reaches ``char``: a binary search
        lo, hi = 0, len(response_ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if decoded_len(mid) < char else (lo, mid)
        return lo

    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    steps, ends, pos = [], [], 0
    for piece in text.split(separator):
        start = pos
        pos += len(piece) + len(separator)
        if not piece.strip():
            continue
        last_char = start + len(piece.rstrip())  # the step ends at its last non-space character
        steps.append(piece.strip())
        ends.append(last_token(last_char))
    return steps, ends  # steps == data.layout.split_steps(text, separator): the split dense-irl trains on


def place_rewards(step_rewards: list[float], ends: list[int], length: int, place: str = "last") -> torch.Tensor:
    """A (length,) tensor of token rewards: each step's reward on its last token, or spread over its tokens.
    Steps beyond ``step_rewards`` (cut at the reward model's max_length) get nothing."""
    if place not in PLACES:
        raise ValueError(f"place must be one of {list(PLACES)}, got {place!r}")
    out = torch.zeros(length, dtype=torch.float32)
    prev = -1
    for r, end in zip(step_rewards, ends):
        if place == "last":
            out[end] += r
        else:
            out[prev + 1 : end + 1] += r / (end - prev)
        prev = end
    return out


def dense_rewards(tokenizer, prompts: list[list[int]], responses: list[list[int]], response_length: int,
                  score_fn: Callable[[list[Chain]], list[list[float]]], separator: str, place: str = "last"
                  ) -> tuple[torch.Tensor, list[Chain], list[list[float]]]:
    """Token rewards (B, response_length) of a batch of rollouts, with the chains and the step rewards."""
    chains, ends = [], []
    for p, r in zip(prompts, responses):
        steps, e = step_end_tokens(tokenizer, r, separator)
        chains.append((prompt_text(tokenizer, p), steps or [""]))
        ends.append(e or [max(0, len(r) - 1)])
    step_rewards = score_fn(chains)
    rows = [place_rewards(s, e, response_length, place) for s, e in zip(step_rewards, ends)]
    return torch.stack(rows) if rows else torch.zeros(0, response_length), chains, step_rewards
