"""Token in, token out: chat-template arithmetic on token ids for multi-turn episodes.

A multi-turn rollout must feed the model exactly the ids it sampled, never a
re-tokenization of their decoded text (which can split differently). So an
episode is built by concatenation:

    encode_prompt([sys?, u1])       # ... <|im_start|>assistant\\n
    + close_assistant(sampled_a1)   # a1 ids verbatim, then <|im_end|>\\n
    + user_turn_ids(u2)             # <|im_start|>user\\n u2 <|im_end|>\\n
                                    # <|im_start|>assistant\\n

and for templates with the prefix property (ChatML, Llama 3) this equals the
ids of `apply_chat_template([sys?, u1, a1, u2], add_generation_prompt=True)`.
The pieces are found by rendering small probe conversations and taking
token-id differences, so any template with that property works; one that
re-renders earlier turns differently raises a clear error.

`char_tokenizer` builds a character-level tokenizer offline (no Hub access)
with a ChatML template, for tests and toy models.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
import jinja2.nodes
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from reflax import storage

Message = dict[str, Any]

# ChatML as Qwen2.5 renders it (without Qwen's default system prompt); tools go into the
# system turn and tool results come back as user turns wrapped in <tool_response>.
CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] "
    "+ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK = "<unk>"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (llama.cpp's single-file checkpoint, tokenizer
    included), by its suffix; the file itself is checked when read."""
    return os.fspath(path).lower().endswith(".gguf")


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    """`transformers.AutoTokenizer.from_pretrained` (a local directory, a Hub id, or a GGUF
    file, whose metadata holds the vocabulary, merges and chat template); a gs:// path is
    read through a local copy (reflax.storage.local_path)."""
    path = storage.local_path(path_or_id)
    if is_gguf(path):
        directory, name = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(directory, gguf_file=name, **kwargs)
    return AutoTokenizer.from_pretrained(path, **kwargs)


class ChatTokens:
    """Chat-template pieces as token ids, for building multi-turn episodes id by id.

    Attributes:
      turn_suffix_ids: ids the template puts after an assistant message's content
        (ChatML: "<|im_end|>\\n"; Llama 3: "<|eot_id|>").
      stop_ids: ids that end a sampled assistant turn (eos, the end-of-turn token).
      pad_id: the tokenizer's pad id, else its eos id.
    """

    # contents for probe conversations; the first that tokenizes cleanly is used
    _PROBES = ("ok", "Hi", "yes", "a", "1", "x")

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, extra_stop_ids: Iterable[int] = ()):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} has no chat_template")
        self.tokenizer = tokenizer
        self._probe = self._find_probe()
        self.turn_suffix_ids: list[int] = self._find_turn_suffix()
        special = set(tokenizer.all_special_ids)
        stop = list(extra_stop_ids)
        eos = tokenizer.eos_token_id
        stop += eos if isinstance(eos, list) else [] if eos is None else [eos]
        stop += [i for i in self.turn_suffix_ids if i in special]
        self.stop_ids: list[int] = list(dict.fromkeys(stop))
        if not self.stop_ids:
            raise ValueError("tokenizer has no eos token and its template no end-of-turn token")
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.stop_ids[0]

    # ---------------------------------------------------------------- rendering

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, without bos/eos."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Ids of the template applied to messages (the template itself adds any bos)."""
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed to render {len(messages)} messages: {e}") from e
        return self.encode(text)

    def encode_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """Ids of a conversation followed by the generation prompt for the assistant's turn.

        `tools` (JSON-schema function descriptions) are rendered by the template;
        a template that does not mention `tools` raises ValueError instead of
        silently dropping them: describe the tools in the system message then.
        """
        if tools and "tools" not in (self.tokenizer.chat_template or ""):
            raise ValueError(
                "this tokenizer's chat template does not render `tools`; describe the tools in "
                "the system message and call encode_prompt without tools"
            )
        return self.render(messages, add_generation_prompt=True, tools=tools)

    # ---------------------------------------------------------------- id arithmetic

    def close_assistant(self, sampled_ids: Sequence[int]) -> list[int]:
        """Sampled ids completed into a closed assistant turn, as the template renders it.

        The content ids are kept verbatim (token in, token out); one trailing stop
        token (eos or the end-of-turn token) is dropped and the template's turn
        suffix appended, so truncated samples are closed the same way.
        """
        ids = list(sampled_ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return ids + self.turn_suffix_ids

    def user_turn_ids(self, content: str) -> list[int]:
        """Ids of a new user turn after a closed assistant turn, plus the next generation prompt.

        Computed as the id difference between rendering [u, a] and [u, a, user].
        """
        p = self._probe
        before = [{"role": "user", "content": p}, {"role": "assistant", "content": p}]
        base = self.render(before, add_generation_prompt=False)
        full = self.render(
            before + [{"role": "user", "content": content}], add_generation_prompt=True
        )
        if full[: len(base)] != base:
            raise ValueError(
                "chat template re-renders earlier turns when a user turn is appended, so turns "
                "cannot be concatenated as ids: "
                f"{self.decode(base)!r} is not a prefix of {self.decode(full)!r}"
            )
        return full[len(base) :]

    # ---------------------------------------------------------------- probing

    def _find_probe(self) -> str:
        unk = self.tokenizer.unk_token_id
        for text in self._PROBES:
            ids = self.encode(text)
            if ids and unk not in ids and self.decode(ids) == text:
                return text
        raise ValueError(
            f"none of the probe texts {self._PROBES} round-trips through the tokenizer"
        )

    def _find_turn_suffix(self) -> list[int]:
        p = self._probe
        user = [{"role": "user", "content": p}]
        prompt = self.render(user, add_generation_prompt=True)
        closed = self.render(
            user + [{"role": "assistant", "content": p}], add_generation_prompt=False
        )
        content = self.encode(p)
        if closed[: len(prompt)] != prompt:
            raise ValueError(
                "chat template re-renders earlier turns when an assistant turn is appended, so "
                f"turns cannot be concatenated as ids: {self.decode(prompt)!r} is not a prefix "
                f"of {self.decode(closed)!r}"
            )
        if closed[len(prompt) : len(prompt) + len(content)] != content:
            raise ValueError(
                "chat template does not render an assistant turn as generation prompt + content "
                f"+ suffix: prompt {self.decode(prompt)!r}, conversation {self.decode(closed)!r}"
            )
        suffix = closed[len(prompt) + len(content) :]
        if not suffix:
            raise ValueError("chat template closes assistant turns with nothing")
        return suffix


# ------------------------------------------------------------------------- char tokenizer


def _template_chars(template: str, special_tokens: Sequence[str]) -> str:
    """Characters of the literal text in a jinja template (special-token strings removed)."""
    ast = jinja2.Environment().parse(template)
    parts = [n.data for n in ast.find_all(jinja2.nodes.TemplateData)]
    parts += [n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)]
    text = "".join(parts)
    for tok in sorted(special_tokens, key=len, reverse=True):
        text = text.replace(tok, "")
    return text


def char_tokenizer(
    alphabet: str,
    *,
    chat_template: str | None = CHATML,
    special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    bos_token: str | None = None,
    digit_group: int = 1,
    words: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, built offline.

    Ids: the special tokens first (in order), then `<unk>`, then each distinct
    character of `alphabet`, then any other character the chat template's
    literal text needs (role names, newlines), so rendering never yields <unk>.
    With `digit_group` = D > 1, a run of digits is split left to right into groups
    of up to D digits, each one token (as Llama 3 does with D = 3): every string
    of 1..D digits gets an id after the characters, so `12+7` is 3 tokens.
    Each string in `words` is one token wherever it occurs (longest first, as a BPE
    merge would make `assistant` or `minus` one token); ids come last.
    Defaults are Qwen-instruct-like: eos `<|im_end|>`, pad `<|endoftext|>`.
    Saves and loads with `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    for tok in (eos_token, pad_token, bos_token):
        if tok is not None and tok not in special_tokens:
            raise ValueError(f"{tok!r} is not one of the special tokens {list(special_tokens)}")
    if not 1 <= digit_group <= 4:
        raise ValueError(f"digit_group must be in [1, 4] (10**D ids per width), got {digit_group}")
    words = sorted(set(words), key=lambda w: (-len(w), w))
    bad = [w for w in words if len(w) < 2 or w in special_tokens]
    if bad:
        raise ValueError(f"words must be strings of 2+ characters, not special tokens: {bad}")
    chars = alphabet + (_template_chars(chat_template, special_tokens) if chat_template else "")
    vocab = {t: i for i, t in enumerate([*special_tokens, UNK])}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    if digit_group > 1:
        for width in range(1, digit_group + 1):
            for n in range(10**width):
                vocab.setdefault(str(n).zfill(width), len(vocab))
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    pattern = "|".join(
        [*(re.escape(w) for w in words)]
        + ([rf"\d{{1,{digit_group}}}"] if digit_group > 1 else [])
        + [r"[\s\S]"]
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters, no separator
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    named = {eos_token, pad_token, bos_token} - {None}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        bos_token=bos_token,
        unk_token=UNK,
        additional_special_tokens=[t for t in special_tokens if t not in named],
        chat_template=chat_template,
    )
