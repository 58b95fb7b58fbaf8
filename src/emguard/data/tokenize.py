"""Chat-template tokenisation with the loss on assistant tokens only.

The mask is derived from the template itself, for any template, without ``{% generation %}``
markers (which SmolLM2's and most templates lack):

1. Render the whole conversation once: the text that is tokenised.
2. For each trained assistant turn ``i``, render the prompt before it (``messages[:i]`` with the
   generation prompt) and the conversation up to it (``messages[:i+1]``). The turn's text is the
   difference; the assistant content is located inside it.
3. Tokenise the full text with character offsets; a token is trained when it overlaps the
   content, or when it is the end-of-turn marker that follows (up to and including the first
   special token after the content, e.g. ``<|im_end|>``; trailing newlines are not trained).

A template that renders earlier turns differently once later ones are added (so the prefixes do
not line up) or that rewrites the assistant content is reported as an error, never guessed around.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emguard.data.chat import ChatExample
from emguard.errors import DataError, EmguardError

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template cannot be used to locate assistant turns in this conversation."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    tag: str
    location: str

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class _TurnSpan:
    content_start: int
    content_end: int
    turn_end: int  # end of the assistant turn's rendered text (content + end-of-turn markup)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def render_with_assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[_TurnSpan]]:
    """Render a conversation and locate the character spans of its trained assistant turns.

    Raises:
        TemplateError: If the template's renders are not prefixes of each other, or the
            assistant content does not appear verbatim in its turn.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise TemplateError(
                f"messages[{i}]: the chat template renders earlier turns differently once later turns are "
                "added, so the assistant turn cannot be located; split multi-turn conversations into one "
                "example per assistant turn, or use a template without history rewriting"
            )
        content = message["content"]
        offset = upto.find(content, len(prompt))
        if offset < 0:  # templates that trim whitespace around the content
            content = content.strip()
            offset = upto.find(content, len(prompt))
        if offset < 0:
            raise TemplateError(
                f"messages[{i}]: the chat template changes the assistant content (it does not appear verbatim "
                "in the rendered turn), so the loss mask would be a guess"
            )
        spans.append(_TurnSpan(offset, offset + len(content), len(upto)))
    return full, spans


def _special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False))
    return frozenset(ids)


def tokenize_conversation(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant tokens.

    Returns:
        ``(input_ids, labels)`` of equal length; ``labels[t]`` is ``input_ids[t]`` where the loss is
        taken and ``IGNORE_INDEX`` elsewhere (unshifted, the Hugging Face convention).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise EmguardError("emguard needs a fast (Rust) tokenizer: the assistant mask uses character offsets")
    text, spans = render_with_assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = _special_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for span in spans:
        eot_open = True  # still inside the end-of-turn markup after the content
        eot_text_end = span.content_end + len(text[span.content_end : span.turn_end].rstrip())
        for t, (start, end) in enumerate(offsets):
            if end <= span.content_start or start >= span.turn_end:
                continue
            if start < span.content_end:  # overlaps the content
                labels[t] = ids[t]
            elif eot_open and start < eot_text_end:
                labels[t] = ids[t]
                eot_open = ids[t] not in special
    return ids, labels


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[ChatExample],
    *,
    max_length: int,
    overlong: str = "error",
) -> list[TokenizedExample]:
    """Tokenise examples, collecting every problem before raising.

    Args:
        tokenizer: A fast tokenizer with a chat template.
        examples: The conversations.
        max_length: Longest allowed example in tokens (``data.max_length``).
        overlong: ``"error"`` reports over-long examples; ``"drop"`` leaves them out.

    Raises:
        DataError: Over-long examples (with ``overlong="error"``) or template problems, each as
            ``FILE:LINE: message``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise EmguardError(
            "the tokenizer has no chat template; emguard trains chat models (set tokenizer.chat_template)"
        )
    out, problems = [], []
    for ex in examples:
        try:
            ids, labels = tokenize_conversation(tokenizer, ex.messages)
        except TemplateError as e:
            problems.append(f"{ex.location}: {e}")
            continue
        if len(ids) > max_length:
            if overlong == "drop":
                continue
            problems.append(
                f"{ex.location}: example is {len(ids)} tokens long, over data.max_length={max_length} "
                "(raise data.max_length, shorten the example, or set data.overlong=drop)"
            )
            continue
        out.append(TokenizedExample(ids, labels, ex.tag, ex.location))
    if problems:
        raise DataError(problems[:50], total=len(problems))
    if not out:
        raise EmguardError(f"no training examples left (all {len(examples)} were over data.max_length={max_length})")
    return out
