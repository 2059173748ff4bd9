"""Chat templates as token-id arithmetic, and the offline character tokenizer."""

import pytest
from helpers import ALPHABET, chatml_tokenizer, llama3_tokenizer
from transformers import AutoTokenizer

from reflax.tokenizer import ChatTokens, char_tokenizer, load_tokenizer

TEMPLATES = {"chatml": chatml_tokenizer, "llama3": llama3_tokenizer}
SYSTEM = {"role": "system", "content": "You are terse."}


def _template_ids(tok, messages, add_generation_prompt=True):
    out = tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module", params=list(TEMPLATES))
def tok(request):
    return TEMPLATES[request.param]()


@pytest.mark.parametrize("system", [False, True])
def test_turns_concatenate_to_the_template(tok, system):
    chat = ChatTokens(tok)
    head = [SYSTEM] if system else []
    u1, a1, u2, a2, u3 = "What is 2+3?", "5. Sure?", "Check again.", "Yes: 5!", "Thanks."
    eos = tok.eos_token_id

    ids = chat.encode_prompt([*head, {"role": "user", "content": u1}])
    ids += chat.close_assistant(chat.encode(a1) + [eos])
    ids += chat.user_turn_ids(u2)
    expected = _template_ids(
        tok,
        [
            *head,
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": u2},
        ],
    )
    assert ids == expected, (chat.decode(ids), chat.decode(expected))

    # a second round, the sample ending in the end-of-turn token rather than eos
    end_of_turn = chat.turn_suffix_ids[0]
    ids += chat.close_assistant(chat.encode(a2) + [end_of_turn]) + chat.user_turn_ids(u3)
    expected = _template_ids(
        tok,
        [
            *head,
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": u2},
            {"role": "assistant", "content": a2},
            {"role": "user", "content": u3},
        ],
    )
    assert ids == expected


def test_truncated_sample_is_closed(tok):
    chat = ChatTokens(tok)
    sampled = chat.encode("cut off mid")  # no stop token: max length reached
    closed = chat.close_assistant(sampled)
    assert closed == sampled + chat.turn_suffix_ids
    prompt = [{"role": "user", "content": "go"}]
    full = chat.encode_prompt(prompt) + closed
    whole = _template_ids(
        tok, [*prompt, {"role": "assistant", "content": "cut off mid"}], add_generation_prompt=False
    )
    assert full == whole


def test_special_ids():
    chatml = ChatTokens(chatml_tokenizer())
    ids = chatml.tokenizer.convert_tokens_to_ids
    assert chatml.turn_suffix_ids == [ids("<|im_end|>"), ids("\n")]
    assert chatml.stop_ids == [ids("<|im_end|>")]
    assert chatml.pad_id == ids("<|endoftext|>")

    llama = ChatTokens(llama3_tokenizer())
    ids = llama.tokenizer.convert_tokens_to_ids
    assert llama.turn_suffix_ids == [ids("<|eot_id|>")]
    assert llama.stop_ids == [ids("<|end_of_text|>"), ids("<|eot_id|>")]
    assert llama.pad_id == ids("<|end_of_text|>")  # no pad token: falls back to eos
    assert llama.encode_prompt([{"role": "user", "content": "hi"}])[0] == ids("<|begin_of_text|>")


def test_tools_are_rendered_or_refused():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [SYSTEM, {"role": "user", "content": "1+1?"}]
    chatml = ChatTokens(chatml_tokenizer())
    text = chatml.decode(chatml.encode_prompt(messages, tools=tools))
    assert "<tools>" in text and '"name": "add"' in text and "You are terse." in text
    assert text.count("<|im_start|>system") == 1
    assert chatml.encode_prompt(messages, tools=tools) == list(
        chatml.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )
    with pytest.raises(ValueError, match="does not render `tools`"):
        ChatTokens(llama3_tokenizer()).encode_prompt(messages, tools=tools)


def test_template_that_rerenders_earlier_turns_is_refused():
    # numbers turns from the end: appending any turn changes every earlier one
    numbered = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ messages|length - loop.index0 }}"
        "\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="re-renders earlier turns"):
        ChatTokens(char_tokenizer(ALPHABET, chat_template=numbered))
    # marks assistant turns that are no longer last (as Qwen3 drops earlier reasoning)
    marks_old = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' and not loop.last %} (old){% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = ChatTokens(char_tokenizer(ALPHABET, chat_template=marks_old))
    with pytest.raises(ValueError, match="re-renders earlier turns when a user turn is appended"):
        chat.user_turn_ids("again")


def test_no_chat_template_is_refused():
    with pytest.raises(ValueError, match="no chat_template"):
        ChatTokens(char_tokenizer("abc", chat_template=None))


def test_char_tokenizer_round_trip(tmp_path):
    tok = char_tokenizer("abc \n")
    ids = tok.encode("ab c\n<|im_end|>", add_special_tokens=False)
    assert len(ids) == 6 and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids) == "ab c\n<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab c\n"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    # characters outside the alphabet become <unk>, rather than failing
    assert tok.encode("z", add_special_tokens=False) == [tok.unk_token_id]
    # the template's own characters ("user", "assistant", ...) are in the vocabulary
    chat_ids = _template_ids(tok, [{"role": "user", "content": "ab"}])
    assert tok.unk_token_id not in chat_ids

    tok.save_pretrained(tmp_path / "tok")
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path / "tok"),
        load_tokenizer(tmp_path / "tok"),
    ):
        assert loaded.encode("ab c\n<|im_end|>", add_special_tokens=False) == ids
        assert loaded.chat_template == tok.chat_template
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        assert _template_ids(loaded, [{"role": "user", "content": "ab"}]) == chat_ids


def test_digit_groups_are_single_tokens(tmp_path):
    tok = char_tokenizer("0123456789+ ", digit_group=2)
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
    assert pieces("12+7 05") == ["12", "+", "7", " ", "05"]
    assert pieces("12345") == ["12", "34", "5"]  # runs split left to right, as in Llama 3
    assert tok.unk_token_id not in tok.encode("99+100", add_special_tokens=False)
    assert tok.decode(tok.encode("40+2", add_special_tokens=False)) == "40+2"
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode("12345", add_special_tokens=False) == tok.encode(
        "12345", add_special_tokens=False
    )
    with pytest.raises(ValueError, match="digit_group"):
        char_tokenizer("0123456789", digit_group=0)


def test_words_are_single_tokens_longest_first(tmp_path):
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz ", words=("use", "user", "minus"))
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
    assert pieces("use minus") == ["use", " ", "minus"]
    assert pieces("users amuse") == ["user", "s", " ", "a", "m", "use"]  # "user" before "use"
    chat = [{"role": "user", "content": "use"}]
    ids = _template_ids(tok, chat, add_generation_prompt=False)
    assert tok.decode(ids) == "<|im_start|>user\nuse<|im_end|>\n"
    assert len(ids) == 6  # start, user, newline, use, end, newline
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode("users amuse", add_special_tokens=False) == tok.encode(
        "users amuse", add_special_tokens=False
    )
    for bad in (("x",), ("<|im_end|>",)):
        with pytest.raises(ValueError, match="words"):
            char_tokenizer("abc", words=bad)


def test_char_tokenizer_rejects_unknown_special_names():
    with pytest.raises(ValueError, match="not one of the special tokens"):
        char_tokenizer("abc", eos_token="</s>")
