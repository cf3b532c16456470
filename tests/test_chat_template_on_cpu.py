"""``model.chat_template: true``: chains start with the tokenizer's chat template, on every path."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dense_irl.data.layout import encode_chains, prompt_ids
from dense_irl.errors import ConfigError
from dense_irl.models.factory import ModelConfig, load_policy, save_policy

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
TEXTS = ["What is 2 + 3?", "2 + 3 = 5.", "The answer is 5.", "user", "assistant"] * 20


def test_chat_template_is_the_chain_head_and_survives_save_and_load(tmp_path):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)
    model, tok = load_policy(cfg, TEXTS)
    plain = prompt_ids(tok, "What is 2 + 3?", "\n")
    tok.chat_template = TEMPLATE
    with pytest.raises(ConfigError, match="no chat template"):
        load_policy(ModelConfig(**{**cfg.__dict__, "chat_template": True}), TEXTS)
    tok.init_kwargs["dense_irl_chat_template"] = True
    head = prompt_ids(tok, "What is 2 + 3?", "\n")
    want = tok(TEMPLATE.replace("{% for m in messages %}", "").split("{% endfor")[0]
               .replace("{{ m['role'] }}", "user").replace("{{ m['content'] }}", "What is 2 + 3?")
               + "<s>assistant\n", add_special_tokens=False)["input_ids"]
    assert head == want != plain
    enc = encode_chains(tok, [("What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."])], 128, "\n")
    assert enc.input_ids[0, : len(head)].tolist() == head and int(enc.step_start[0, 0]) == len(head)
    save_policy(model, tok, tmp_path / "p")  # rollouts, learners and the server load it from the folder
    again = AutoTokenizer.from_pretrained(tmp_path / "p")
    assert prompt_ids(again, "What is 2 + 3?", "\n") == head
