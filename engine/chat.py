"""Chat messages -> prompt ids: validated messages, the checkpoint's template, content encoded as plain text.

Special tokens come only from the template. Each message's content is replaced by a marker while the template is
rendered; special tokens are then recognised in the template's text only, and the plain text between them
(template text and contents together, as a whole-string encode would see it) is tokenised with special tokens
split into plain text, so text that spells a control token (`<|eot_id|>`, a role header) stays text and cannot
forge a turn. Content is inserted as the template would (whitespace trimmed when the
template trims it, detected from the padding around the marker).
"""
from __future__ import annotations

import re
import threading
from typing import Any

from .errors import ChatMessageError

ROLES = ("system", "user", "assistant", "tool")
_MARK = re.compile("( ?)\ue000(\\d+)\ue001( ?)")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """[{role, content}] with role one of ROLES and content a string (OpenAI text parts are joined with newlines).
    Raises ChatMessageError naming the message index and field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatMessageError("messages: must be a non-empty list of {role, content} messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatMessageError(f"{where}: must be an object with 'role' and 'content', got {type(m).__name__}",
                                   where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatMessageError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if "content" not in m:
            raise ChatMessageError(f"{where}.content: missing", f"{where}.content")
        out.append({"role": role, "content": _content(m["content"], f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatMessageError(f"{where}[{j}]: only text parts {{'type': 'text', 'text': str}} are "
                                       f"supported, got {part!r:.80}", f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatMessageError(f"{where}: must be a string or a list of text parts, got {type(value).__name__}", where)


def encode_chat(tokenizer: Any, messages: Any, lock: threading.Lock, tools: list[dict] | None = None) -> list[int]:
    """Prompt ids of `messages` under the tokenizer's chat template, with the generation prompt; `tools` (OpenAI
    function tools) are passed to the template when it has a tool format (it mentions `tools`), else left out."""
    msgs = normalize_messages(messages)
    marked = [{"role": m["role"], "content": f" \ue000{i}\ue001 "} for i, m in enumerate(msgs)]
    extra = {"tools": tools} if tools and supports_tools(tokenizer) else {}
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False, **extra)
    specials = _special_tokens(tokenizer)
    runs: list[str | int] = []  # plain-text runs (template text and contents merged) and special token ids

    def text(t: str) -> None:
        if runs and isinstance(runs[-1], str):
            runs[-1] += t
        elif t:
            runs.append(t)

    def template(t: str) -> None:  # special tokens are recognised in the template's own text only
        pos = 0
        for m in specials[0].finditer(t) if specials[0] is not None else ():
            text(t[pos:m.start()])
            runs.append(specials[1][m.group(0)])
            pos = m.end()
        text(t[pos:])

    pos = 0
    for m in _MARK.finditer(rendered):
        template(rendered[pos:m.start()])
        content = msgs[int(m.group(2))]["content"]
        content = content if m.group(1) else content.lstrip()
        content = content if m.group(3) else content.rstrip()
        text(content)
        pos = m.end()
    template(rendered[pos:])
    ids: list[int] = []
    with lock:  # split_special_tokens is a flag on the shared backend tokenizer for the duration of a call
        for r in runs:
            ids += [r] if isinstance(r, int) else tokenizer(r, add_special_tokens=False,
                                                            split_special_tokens=True)["input_ids"]
    return ids


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders OpenAI `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _special_tokens(tokenizer: Any) -> tuple[re.Pattern | None, dict[str, int]]:
    """A pattern matching the tokenizer's special added tokens (longest first), and their ids."""
    table = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not table:
        return None, table
    return re.compile("|".join(re.escape(t) for t in sorted(table, key=len, reverse=True))), table
