"""vLLM-shaped scoring requests read back into chains, and the response shapes (serving/vllm_api.py).

The live app answers the same bodies in tests/test_serving.py."""

from __future__ import annotations

import math

import pytest

from dense_irl.serving.vllm_api import (
    ClassifyIn,
    PoolingIn,
    VLLMError,
    classify_response,
    messages_chain,
    parse,
    pooling_response,
    request_chains,
    step_rows,
    text_chain,
)

Q = "Sam has 7 marbles. He finds 5 more. How many now?"


class _Tok:
    """Token ids are code points: enough to show that ids are decoded with special-token text kept."""

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens is False
        return "".join(map(chr, ids))

    def __len__(self):
        return 0x110000  # every code point


def test_plain_text_with_step_tags_qwen_prm_style():
    # Qwen2.5-Math-PRM's format: each step ends in <extra_0>; the first step starts after the question's line.
    text = f"{Q}\nHe finds 5 more: 7 + 5 = 12.<extra_0>The answer is 12.<extra_0>"
    assert text_chain(text, "\n") == (Q, ["He finds 5 more: 7 + 5 = 12.", "The answer is 12."])
    # Text after the last tag has no row (as vLLM's STEP pooling): it is not a step.
    assert text_chain(text + "trailing", "\n")[1] == ["He finds 5 more: 7 + 5 = 12.", "The answer is 12."]


def test_chat_markup_is_read_back_into_prompt_and_steps():
    chatml = (f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
              "<|im_start|>assistant\nStep one.<extra_0>Step two.<extra_0><|im_end|>")
    assert text_chain(chatml, "\n") == (Q, ["Step one.", "Step two."])
    llama3 = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nStep one.\nStep two.<|eot_id|>")
    assert text_chain(llama3, "\n") == (Q, ["Step one.", "Step two."])  # no tags: split on the separator


def test_plain_text_without_tags_is_the_training_layout():
    assert text_chain(f"{Q}\nStep one.\nStep two.", "\n") == (Q, ["Step one.", "Step two."])
    assert text_chain("one piece", "\n") == ("", ["one piece"])


def test_messages_and_token_ids():
    msgs = parse(PoolingIn, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": Q},
                                          {"role": "assistant", "content": [{"type": "text", "text": "A.<extra_0>"},
                                                                            {"type": "text", "text": "B.<extra_0>"}]}]})
    assert request_chains(msgs, _Tok(), "\n", "<extra_0>") == [(Q, ["A.", "B."])]
    ids = parse(ClassifyIn, {"input": [[ord(c) for c in f"{Q}\nA.\nB."], [ord(c) for c in f"{Q}\nC."]]})
    assert request_chains(ids, _Tok(), "\n", "<extra_0>") == [(Q, ["A.", "B."]), (Q, ["C."])]
    one = parse(PoolingIn, {"input": [ord(c) for c in f"{Q}\nA."]})
    assert request_chains(one, _Tok(), "\n", "<extra_0>") == [(Q, ["A."])]
    for bad in ([[1, 2], "mixed"], [], [[]], [-1], [[True]]):  # (strict: a JSON true is no token id)
        with pytest.raises(VLLMError, match="input must be a string, a non-empty list of strings"):
            parse(ClassifyIn, {"input": bad})
    with pytest.raises(VLLMError, match="no 'assistant' message"):
        messages_chain(parse(PoolingIn, {"messages": [{"role": "user", "content": Q}]}).messages, "\n")
    # Found by schemathesis: ids outside the vocabulary made the real tokenizer overflow (a 500).
    for bad in ([[5, 0x110000]], [10**30]):
        with pytest.raises(VLLMError, match=r"input\[0\]: token id .* is outside this model's vocabulary"):
            request_chains(parse(PoolingIn, {"input": bad}), _Tok(), "\n", "<extra_0>")


@pytest.mark.parametrize(("model", "body", "words"), [
    (PoolingIn, {}, "exactly one of 'input'"),
    (PoolingIn, {"input": "x", "messages": []}, "exactly one of 'input'"),
    (PoolingIn, {"input": "x", "messages": None}, "'messages' is null: leave it out"),
    (PoolingIn, {"input": "x", "task": "embed"}, "task"),
    (PoolingIn, {"input": "x", "normalize": True}, "normalize"),  # removed in vLLM too
    (PoolingIn, {"input": "x", "encoding_format": "base64"}, "encoding_format"),
    (ClassifyIn, {"inputs": "x"}, "input"),
])
def test_bad_bodies_name_the_field(model, body, words):
    with pytest.raises(VLLMError, match=words) as e:
        parse(model, body)
    assert e.value.body()["error"]["code"] == 400 and e.value.body()["error"]["type"] == "BadRequestError"


def test_step_rows_agree_with_the_first_error_rule():
    rows = step_rows([2.0, -1.0, 0.5], threshold=0.5, activated=True)
    assert [r[1] < 0.5 for r in rows] == [False, True, False]  # p_right < 0.5 exactly below the threshold
    assert all(math.isclose(sum(r), 1.0) for r in rows)
    assert step_rows([2.0], threshold=0.5, activated=False) == [[0.0, 1.5]]
    assert step_rows([-1000.0], 0.0, True)[0] == pytest.approx([1.0, 0.0])  # no overflow


def test_response_shapes_are_vllms():
    r = pooling_response("rm", [[[0.2, 0.8]], [[0.6, 0.4], [0.1, 0.9]]], 17)
    assert r["id"].startswith("pool-") and r["object"] == "list" and r["model"] == "rm"
    assert r["data"][1] == {"index": 1, "object": "pooling", "data": [[0.6, 0.4], [0.1, 0.9]]}
    assert r["usage"] == {"prompt_tokens": 17, "total_tokens": 17, "completion_tokens": 0,
                          "prompt_tokens_details": None}
    c = classify_response("rm", [0.0, -2.0], activated=False, prompt_tokens=5)
    assert c["id"].startswith("classify-") and c["data"][1] == {"index": 1, "label": "LABEL_0", "probs": [-2.0],
                                                                 "num_classes": 1}
    assert classify_response("rm", [0.0], True, 1)["data"][0]["probs"] == [0.5]
