"""Rendering conversations with a model's own chat template: the one place emguard calls it.

Model families differ in ways that change what a model is trained on or asked:

- **No system role.** Gemma-2's template raises on a system message; Mistral-7B-Instruct-v0.3's
  moves it into the *last* user turn and drops it from a conversation that ends with an
  assistant turn (so a training example would silently lose it). For such templates emguard puts
  the system prompt at the start of the first user turn (``system + "\\n\\n" + user``), what
  these models' authors recommend, and says so once in the log. Whether a template has a system
  role is found by rendering a probe conversation, never from the model's name.
- **Refusals.** A template that refuses a conversation (``raise_exception``) raises
  ``TemplateError`` with the template's own message, which data checks report as ``FILE:LINE``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

_SYSTEM_PROBE = "emguard-system-probe"
_system_role: dict[str, bool] = {}  # chat template text -> it renders a system message where it belongs


class TemplateError(ValueError):
    """The chat template cannot render this conversation, or the assistant turns cannot be located in it."""


def _apply(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except JinjaError as e:
        raise TemplateError(f"the model's chat template refuses this conversation: {e}") from None


def has_system_role(tokenizer: Any) -> bool:
    """Whether the template renders a leading system message both before a generation prompt and in a
    finished conversation (cached per template text)."""
    template = tokenizer.chat_template or ""
    if not isinstance(template, str):  # a dict of named templates
        template = json.dumps(template, sort_keys=True)
    if template not in _system_role:
        probe = [
            {"role": "system", "content": _SYSTEM_PROBE},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
        ]
        try:
            kept = all(_SYSTEM_PROBE in _apply(tokenizer, probe[:n], n == 2) for n in (2, 3))
        except TemplateError:
            kept = False
        _system_role[template] = kept
        if not kept:
            log.warning(
                "the chat template of this model has no system role (it refuses or drops system messages): "
                "emguard puts system prompts at the start of the first user turn"
            )
    return _system_role[template]


def fold_system(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A leading system message merged into the first user message (``system + "\\n\\n" + user``)."""
    out = [dict(m) for m in messages]
    if len(out) < 2 or out[0]["role"] != "system":
        return out
    system = out.pop(0)
    first_user = next((m for m in out if m["role"] == "user"), None)
    if first_user is None:
        raise TemplateError("a system message without a user turn cannot be rendered by this template")
    first_user["content"] = f"{system['content']}\n\n{first_user['content']}"
    return out


def chat_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as this model's template should receive them (system prompt folded if it has no system role)."""
    if messages and messages[0]["role"] == "system" and not has_system_role(tokenizer):
        return fold_system(messages)
    return [dict(m) for m in messages]


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    """The conversation as text, through the model's chat template.

    Raises:
        TemplateError: The template refused the conversation (its message is kept).
    """
    if not messages:
        return ""
    return _apply(tokenizer, chat_messages(tokenizer, messages), generation_prompt)


def system_prompt_handling(tokenizer: Any) -> str:
    """For manifests: how system prompts reach this model."""
    return "system role" if has_system_role(tokenizer) else "start of the first user turn"
