"""Final answers: read from a completion, normalised for voting, and checked (the outcome verifier)."""

from __future__ import annotations

import re

from dense_irl.data.schema import Demonstration
from dense_irl.data.synthetic import is_correct_answer

FINAL_ANSWER_RE = re.compile(r"(?:answer is|####)\s*\$?(-?[\d,]*\.?\d+)")


def normalise_answer(ans: str) -> str:
    """Answer text for voting: stripped, without commas or '$', and without a trailing '.0'."""
    a = ans.strip().replace(",", "").replace("$", "").strip()
    return re.sub(r"\.0+$", "", a)


def final_answer(text: str) -> str | None:
    """The last final answer ``text`` states (``the answer is N`` or ``#### N``), normalised; None when none."""
    found = FINAL_ANSWER_RE.findall(text)
    return normalise_answer(found[-1]) if found else None


def is_correct(demo: Demonstration, completion: str) -> bool:
    """Whether ``completion``'s final answer is right: the synthetic verifier, else the demo's ``answer``."""
    if demo.source == "synthetic":
        return is_correct_answer(demo.meta, completion)
    found = FINAL_ANSWER_RE.findall(completion)
    return bool(found) and demo.answer is not None and normalise_answer(found[-1]) == normalise_answer(demo.answer)
