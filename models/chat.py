"""Chat rendering that cannot be hijacked by special tokens typed into a message.

Messages are rendered through the tokenizer's own chat template. The message *contents*
are tokenized separately with special-token splitting on, so a user who types
`<|end|>` or `</s>` gets ordinary text tokens, never the template's control tokens.

Tokenizers without a chat template use `FALLBACK_TEMPLATE`: `### System:`, `### User:` and
`### Assistant:` headers, each followed by the content and a blank line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from neuronguard.errors import UsageError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
ROLES = frozenset({"system", "user", "assistant"})
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
# transformers toggles a flag shared by the whole tokenizer (`encode_special_tokens`) on each encode
# call with `split_special_tokens`, so concurrent encodes could read user text with special tokens on.
_ENCODE_LOCK = threading.Lock()


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.chat_template or FALLBACK_TEMPLATE


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text as the template renders it (for display and logging with consent)."""
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        chat_template=chat_template(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a conversation; content text never produces special tokens."""
    if not messages:
        raise UsageError("messages must not be empty")
    for message in messages:
        if message.get("role") not in ROLES:
            raise UsageError(f"unknown role {message.get('role')!r}: use one of {', '.join(sorted(ROLES))}")
    contents = [str(m.get("content") or "") for m in messages]
    masked = [{"role": m["role"], "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = render_chat(tokenizer, masked, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own errors for conversations a template rejects
        raise UsageError(f"the model's chat template rejected the conversation: {exc}") from exc
    ids: list[int] = []
    cursor = 0
    with _ENCODE_LOCK:
        for match in _PLACEHOLDER_RE.finditer(rendered):
            ids += tokenizer.encode(rendered[cursor : match.start()], add_special_tokens=False)
            ids += tokenizer.encode(contents[int(match.group(1))], add_special_tokens=False, split_special_tokens=True)
            cursor = match.end()
        ids += tokenizer.encode(rendered[cursor:], add_special_tokens=False)
    return ids


Request = str | Sequence[Mapping[str, str]]  # one user turn, or a whole conversation


def as_messages(request: Request) -> list[dict[str, str]]:
    """The conversation of a request: a string is one user turn."""
    if isinstance(request, str):
        return [{"role": "user", "content": request}]
    return [dict(turn) for turn in request]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, request: Request) -> list[int]:
    """A request rendered as chat, ready for the assistant's answer: the form in which harmful
    requests reach a model (a plain string is a single user turn)."""
    return encode_chat(tokenizer, as_messages(request))
