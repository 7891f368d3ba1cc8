"""Turn a conversation into the token ids that the engine scores.

The model's own tokenizer and chat template render the conversation. The
response's place in the rendered text is found by rendering the conversation a
second time with a marker in place of the response, so templates that trim
content or add text around turns still give the exact span. Token ids start with
at most one BOS token: one is added when the tokenizer normally adds it and the
template did not, and a repeated leading BOS is dropped.
"""

from __future__ import annotations

import logging
import string
import uuid
from dataclasses import dataclass, replace
from typing import Any

from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# Stands in for the response while locating it in the rendered text. It has no
# whitespace at either end, so templates that trim content keep it whole.
RESPONSE_MARKER = "\u2063RMS-RESPONSE-7f3a9c\u2063"
# Texts longer than this are tokenized in a way that releases the GIL.
GIL_RELEASE_CHARS = 10_000


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of a rendered conversation and where the response lies in them."""

    token_ids: list[int]
    # The response is token_ids[response_start:response_end].
    response_start: int
    response_end: int
    truncated_tokens: int = 0

    @property
    def response_tokens(self) -> int:
        return self.response_end - self.response_start


class ConversationRenderer:
    """Render and tokenize conversations for one model."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        judge_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.judge_template = judge_template
        self.bos_token_id: int | None = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_token_id is not None and probe[:1] == [
            self.bos_token_id
        ]

    def tokenize(self, messages: list[dict[str, Any]]) -> TokenizedConversation:
        """Render the conversation and locate the final message's tokens.

        The last message must be the assistant response; the caller checks that.
        """
        text, start, end = self._render(messages)
        return self._tokenize_text(text, start, end)

    def _render(self, messages: list[dict[str, Any]]) -> tuple[str, int, int]:
        """Return the rendered text and the response's character span in it."""
        response = messages[-1]["content"]
        marker = RESPONSE_MARKER
        while any(marker in message["content"] for message in messages):
            # The conversation quotes the marker, so pick one it does not contain.
            marker = f"{RESPONSE_MARKER}{uuid.uuid4().hex}"
        marked_text = self._apply_template(messages[:-1], marker, messages[-1])
        text = self._apply_template(messages[:-1], response, messages[-1])
        position = marked_text.find(marker)
        prefix = marked_text[:position]
        suffix = marked_text[position + len(marker) :]
        if (
            position < 0
            or not text.startswith(prefix)
            or not text.endswith(suffix)
            or len(text) < len(prefix) + len(suffix)
        ):
            raise InvalidRequestError(
                "prompt_with_response: the chat template changes the text around "
                "the response, so the response cannot be located in it",
                param="prompt_with_response",
            )
        return text, len(prefix), len(text) - len(suffix)

    def _apply_template(
        self,
        prompt: list[dict[str, Any]],
        response: str,
        response_message: dict[str, Any],
    ) -> str:
        if self.judge_template is not None:
            question = self.judge_template.format(
                conversation=format_transcript(prompt), response=response
            )
            conversation = [{"role": "user", "content": question}]
            add_generation_prompt = True
        else:
            conversation = [*prompt, {**response_message, "content": response}]
            add_generation_prompt = False
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as error:
            # Templates raise jinja2 errors (or ValueError) for conversations
            # they do not support, such as a missing user turn.
            raise InvalidRequestError(
                f"prompt_with_response: the model's chat template rejected the "
                f"conversation: {error}",
                param="prompt_with_response",
            ) from error

    def _tokenize_text(self, text: str, start: int, end: int) -> TokenizedConversation:
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Calls the Rust tokenizer directly, which skips the BatchEncoding
            # that transformers' __call__ builds around the same ids and offsets.
            if len(text) > GIL_RELEASE_CHARS:
                # encode holds the GIL throughout, but encode_batch releases it.
                # So a worker thread can tokenize a long text without stalling
                # the event loop.
                encoding = backend.encode_batch([text], add_special_tokens=False)[0]
            else:
                encoding = backend.encode(text, add_special_tokens=False)
            token_ids = list(encoding.ids)
            offsets = encoding.offsets
            # A token that straddles the start of the response counts as part
            # of the response, so that no response character goes unscored.
            response_start = next(
                (i for i, (_, stop) in enumerate(offsets) if stop > start),
                len(token_ids),
            )
            response_end = next(
                (i for i, (begin, _) in enumerate(offsets) if begin >= end),
                len(token_ids),
            )
            # An empty response has no tokens, even where a token straddles
            # its place.
            response_end = response_start if end <= start else response_end
            response_end = max(response_end, response_start)
        else:
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            response_start = len(
                tokenizer.encode(text[:start], add_special_tokens=False)
            )
            response_end = len(tokenizer.encode(text[:end], add_special_tokens=False))

        bos = self.bos_token_id
        if self.adds_bos and token_ids[:1] != [bos]:
            token_ids.insert(0, bos)
            response_start += 1
            response_end += 1
        while len(token_ids) > 1 and token_ids[0] == bos and token_ids[1] == bos:
            del token_ids[0]
            response_start -= 1
            response_end -= 1
        return TokenizedConversation(token_ids, response_start, response_end)


TEMPLATE_FIELDS = ("conversation", "response")


def check_prompt_template(template: str) -> str:
    """Return a judge prompt template, or raise ValueError naming the problem.

    Placeholders are exactly ``{conversation}`` (any number of times) and
    ``{response}`` (once), without format specs, conversions or attribute
    access: ``{response:>300000000}`` would let a request allocate gigabytes.
    """
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(
            f"invalid template ({error}); write literal braces as {{{{ and }}}}"
        ) from error
    names = []
    for _, name, format_spec, conversion in fields:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or format_spec or conversion:
            raise ValueError(
                f"invalid placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + format_spec if format_spec else ''}}}; the template may only "
                f"use the {{conversation}} and {{response}} placeholders, and "
                f"literal braces are written {{{{ and }}}}"
            )
        names.append(name)
    if names.count("response") != 1:
        raise ValueError("the template must contain the {response} placeholder once")
    return template


def format_transcript(messages: list[dict[str, Any]]) -> str:
    """Write messages as ``Role: content`` paragraphs for a judge prompt."""
    return "\n\n".join(
        f"{message['role'].capitalize()}: {message['content']}" for message in messages
    )


def fit_to_context(
    conversation: TokenizedConversation,
    max_tokens: int,
    policy: str,
    bos_token_id: int | None,
) -> TokenizedConversation:
    """Drop the oldest prompt tokens so the conversation fits ``max_tokens``.

    A leading BOS token and everything from the response start on are kept.
    Raises InvalidRequestError when the policy is ``error`` or when the kept
    tokens alone do not fit.
    """
    token_ids = conversation.token_ids
    total = len(token_ids)
    if total <= max_tokens:
        return conversation

    kept_prefix = 1 if token_ids[:1] == [bos_token_id] else 0
    needed = kept_prefix + total - conversation.response_start
    if needed > max_tokens:
        raise InvalidRequestError(
            f"prompt_with_response: the response with the template text after it "
            f"needs {needed} tokens but the model's context holds {max_tokens}; "
            f"shorten the response",
            param="prompt_with_response",
        )
    if policy == "error":
        raise InvalidRequestError(
            f"prompt_with_response: the conversation has {total} tokens, more than "
            f"the model's context of {max_tokens}; shorten it or send "
            f'options.truncation="left" to drop the oldest prompt tokens',
            param="prompt_with_response",
        )

    dropped = total - max_tokens
    kept = token_ids[:kept_prefix] + token_ids[kept_prefix + dropped :]
    return replace(
        conversation,
        token_ids=kept,
        response_start=conversation.response_start - dropped,
        response_end=conversation.response_end - dropped,
        truncated_tokens=conversation.truncated_tokens + dropped,
    )
