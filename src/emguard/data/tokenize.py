"""Chat-template tokenisation with the loss on assistant tokens only.

The mask is derived from the template itself, for any template, without ``{% generation %}``
markers (which SmolLM2's and most templates lack):

1. Render the whole conversation once: the text that is tokenised.
2. For each trained assistant turn ``i``, render the prompt before it (``messages[:i]`` with the
   generation prompt) and the conversation up to it (``messages[:i+1]``). The turn's text is the
   difference, up to where the full render goes on differently (Phi-3's template appends its EOS
   token only after the last turn); the assistant content is located inside it.
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
from emguard.data.chat_template import TemplateError, render_chat
from emguard.errors import DataError, EmguardError

IGNORE_INDEX = -100


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


def render_with_assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[_TurnSpan]]:
    """Render a conversation and locate the character spans of its trained assistant turns.

    Raises:
        TemplateError: If the template's renders are not prefixes of each other, or the
            assistant content does not appear verbatim in its turn.
    """
    full = render_chat(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = render_chat(tokenizer, messages[:i], generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(prompt)):
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
        turn_end = _common_prefix(upto, full)  # a trailer only the last turn gets is not this turn's
        if turn_end < len(upto):
            # The renders part inside a token ("<|end|>\n<|" + "endoftext|>" vs "user|>"): end the turn
            # at the last whitespace before that, so nothing of the next turn's header is trained.
            cut = max(upto.rfind(ws, offset + len(content), turn_end) for ws in (" ", "\n", "\t"))
            turn_end = cut + 1 if cut >= 0 else turn_end
        if turn_end < offset + len(content):
            raise TemplateError(
                f"messages[{i}]: the chat template renders this assistant turn differently once later turns "
                "are added, so it cannot be located; split multi-turn conversations into one example per "
                "assistant turn"
            )
        spans.append(_TurnSpan(offset, offset + len(content), turn_end))
    return full, spans


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (named ones and added tokens marked special)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False))
    return frozenset(ids)


def end_of_turn_tokens(tokenizer: Any) -> list[int]:
    """The tokens the chat template puts after an assistant turn's content and that training learns
    to produce (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``...): the trained
    tokens of a rendered one-word answer after its content."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    text, (span,) = render_with_assistant_spans(tokenizer, messages)
    ids, labels = tokenize_conversation(tokenizer, messages)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [
        i
        for i, label, (start, _) in zip(ids, labels, offsets, strict=True)
        if label != IGNORE_INDEX and start >= span.content_end
    ]


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
    special = special_ids(tokenizer)
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
