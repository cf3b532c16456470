"""The chains a request scores, framework-free: ``/v1/score`` items and OpenRLHF ``/get_reward`` queries.

A test checks token for token that the server scores the chain layout that rollouts, SFT and the learners
use (``data.layout``): these chains go to ``RewardModel.score`` -> ``encode_chains``.
"""

from __future__ import annotations

from fastapi import HTTPException

from dense_irl.data.layout import split_steps
from dense_irl.serving.schemas import ChainIn, GetRewardRequest

# Special-token text an OpenRLHF query may end with (decoded with skip_special_tokens=False), and may start
# with when no prompt is given (left padding, <s>): not text of a step.
END_MARKERS = ("</s>", "<pad>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
START_MARKERS = ("<s>", "<pad>", "<|endoftext|>", "<|begin_of_text|>")




def item_chain(item: ChainIn, separator: str, where: str = "the chain") -> tuple[str, list[str]]:
    """The chain ``/v1/score`` scores for one item: its ``steps`` as given, or its ``text`` split by
    ``data.layout.split_steps`` on ``step_separator`` (default ``separator``, the checkpoint's), the split
    that rollouts and text demonstrations get."""
    if item.steps is not None:
        return item.prompt, list(item.steps)
    sep = item.step_separator or separator
    steps = split_steps(item.text, sep)
    if not steps:
        raise HTTPException(422, f"{where}: 'text' has no non-empty step when split on {sep!r}")
    return item.prompt, steps


def _strip_markers(text: str, markers: set[str], at_end: bool) -> str:
    """``text`` without whitespace and any run of ``markers`` at its end (``at_end``) or its start."""
    text = text.rstrip() if at_end else text.lstrip()
    while True:
        hit = next((m for m in markers if (text.endswith(m) if at_end else text.startswith(m))), None)
        if hit is None:
            return text
        text = (text[: -len(hit)].rstrip()) if at_end else text[len(hit) :].lstrip()


def query_chains(body: GetRewardRequest, tokenizer, separator: str) -> list[tuple[str, list[str]]]:
    """The chains ``/get_reward`` scores: each query after its prompt, without the special-token text a decode
    with special tokens leaves around it, split by ``split_steps`` on the checkpoint's ``separator``."""
    ends = {*END_MARKERS, tokenizer.eos_token, tokenizer.pad_token} - {None, ""}
    starts = {*START_MARKERS, tokenizer.bos_token, tokenizer.pad_token} - {None, ""}
    chains = []
    for i, query in enumerate(body.query):
        prompt = body.prompts[i] if body.prompts else ""
        at = query.find(prompt) if prompt else 0
        if at < 0:
            raise HTTPException(
                422, f"query[{i}] does not contain prompts[{i}]: query must be prompt + response"
            )
        response = query[at + len(prompt) :]
        if not prompt:
            response = _strip_markers(response, starts, at_end=False)
        response = _strip_markers(response, ends, at_end=True)
        # An empty response is still scored: as a chain that stops at once.
        chains.append((prompt, split_steps(response, separator) or [""]))
    return chains
