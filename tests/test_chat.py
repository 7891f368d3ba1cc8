"""Rendering, BOS handling, response location and truncation (no engine)."""

from __future__ import annotations

import pytest
from tokenizers import processors

from server.chat import ConversationRenderer, TokenizedConversation, fit_to_context
from server.errors import InvalidRequestError
from tests import tiny_models

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "  Paris is the capital.  "},
]
NO_BOS_TEMPLATE = tiny_models.CHAT_TEMPLATE.replace("{{ bos_token }}", "")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_models.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def bos_adding_tokenizer(tmp_path_factory):
    """A tokenizer that prepends <s> itself, like Llama's."""
    tokenizer = tiny_models.build_tokenizer(tmp_path_factory.mktemp("tok-bos"))
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def response_text(renderer, conversation: TokenizedConversation) -> str:
    ids = conversation.token_ids[
        conversation.response_start : conversation.response_end
    ]
    return renderer.tokenizer.decode(ids)


def test_template_bos_kept_once(tokenizer):
    renderer = ConversationRenderer(tokenizer)
    conversation = renderer.tokenize(MESSAGES)
    bos = tokenizer.bos_token_id
    assert conversation.token_ids[0] == bos
    assert conversation.token_ids.count(bos) == 1


def test_tokenizer_and_template_bos_not_doubled(bos_adding_tokenizer):
    renderer = ConversationRenderer(bos_adding_tokenizer)
    assert renderer.adds_bos
    conversation = renderer.tokenize(MESSAGES)
    bos = bos_adding_tokenizer.bos_token_id
    assert conversation.token_ids[:2].count(bos) == 1


def test_bos_added_when_template_has_none(bos_adding_tokenizer):
    renderer = ConversationRenderer(bos_adding_tokenizer, chat_template=NO_BOS_TEMPLATE)
    conversation = renderer.tokenize(MESSAGES)
    assert conversation.token_ids[0] == bos_adding_tokenizer.bos_token_id
    assert response_text(renderer, conversation) == "Paris is the capital."


def test_no_bos_when_neither_adds_one(tokenizer):
    renderer = ConversationRenderer(tokenizer, chat_template=NO_BOS_TEMPLATE)
    conversation = renderer.tokenize(MESSAGES)
    assert tokenizer.bos_token_id not in conversation.token_ids


def test_response_span_matches_trimmed_content(tokenizer):
    renderer = ConversationRenderer(tokenizer)
    conversation = renderer.tokenize(MESSAGES)
    assert response_text(renderer, conversation) == "Paris is the capital."
    tail = tokenizer.decode(conversation.token_ids[conversation.response_end :])
    assert tail == "<|im_end|>\n"


def test_response_with_template_syntax(tokenizer):
    renderer = ConversationRenderer(tokenizer)
    messages = [*MESSAGES[:2], {"role": "assistant", "content": "{{ x }} {% y %}"}]
    conversation = renderer.tokenize(messages)
    assert response_text(renderer, conversation) == "{{ x }} {% y %}"


def test_empty_response_has_no_tokens(tokenizer):
    renderer = ConversationRenderer(tokenizer)
    messages = [*MESSAGES[:2], {"role": "assistant", "content": ""}]
    assert renderer.tokenize(messages).response_tokens == 0


def test_judge_template_wraps_conversation(tokenizer):
    renderer = ConversationRenderer(
        tokenizer, judge_template="Q:\n{conversation}\nA: {response}\nCorrect?"
    )
    conversation = renderer.tokenize(MESSAGES)
    text = tokenizer.decode(conversation.token_ids)
    assert "User: What is the capital of France?" in text
    assert text.endswith("Correct?<|im_end|>\n<|im_start|>assistant\n")
    # The token that straddles "A: " and the response counts as response.
    assert response_text(renderer, conversation).strip() == "Paris is the capital."


def test_template_that_rewrites_text_is_rejected(tokenizer):
    template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    renderer = ConversationRenderer(tokenizer, chat_template=template)
    with pytest.raises(InvalidRequestError, match="cannot be located"):
        renderer.tokenize(MESSAGES)


def test_template_error_is_invalid_request(tokenizer):
    template = "{{ raise_exception('conversation roles must alternate') }}"
    renderer = ConversationRenderer(tokenizer, chat_template=template)
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        renderer.tokenize(MESSAGES)


def test_fit_keeps_short_conversation():
    conversation = TokenizedConversation([0, 5, 6, 7], 2, 4)
    assert fit_to_context(conversation, 4, "left", 0) is conversation


def test_fit_drops_oldest_prompt_tokens_after_bos():
    conversation = TokenizedConversation([0, 5, 6, 7, 8, 9], 4, 5)
    fitted = fit_to_context(conversation, 4, "left", 0)
    assert fitted.token_ids == [0, 7, 8, 9]
    assert (fitted.response_start, fitted.response_end) == (2, 3)
    assert fitted.truncated_tokens == 2


def test_fit_without_bos():
    conversation = TokenizedConversation([5, 6, 7, 8], 2, 4)
    fitted = fit_to_context(conversation, 3, "left", 0)
    assert fitted.token_ids == [6, 7, 8]
    assert fitted.response_start == 1


def test_fit_error_policy():
    conversation = TokenizedConversation([0, 5, 6, 7, 8, 9], 4, 5)
    with pytest.raises(InvalidRequestError, match="6 tokens"):
        fit_to_context(conversation, 4, "error", 0)


def test_fit_response_too_long():
    conversation = TokenizedConversation([0, 5, 6, 7, 8, 9], 2, 6)
    with pytest.raises(InvalidRequestError, match="shorten the response"):
        fit_to_context(conversation, 4, "left", 0)


def test_prompt_quoting_marker(tokenizer):
    from server.chat import RESPONSE_MARKER

    renderer = ConversationRenderer(tokenizer)
    messages = [
        {"role": "user", "content": f"What does {RESPONSE_MARKER} mean?"},
        {"role": "assistant", "content": "Nothing."},
    ]
    conversation = renderer.tokenize(messages)
    assert response_text(renderer, conversation) == "Nothing."


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{response:>300000000}", id="format-spec"),
        pytest.param("{response!r}", id="conversion"),
        pytest.param("{conversation.__class__}{response}", id="attribute"),
        pytest.param("{conversation[0]}{response}", id="index"),
        pytest.param("{answer}{response}", id="unknown-name"),
        pytest.param("{conversation}", id="no-response"),
        pytest.param("{response}{response}", id="two-responses"),
        pytest.param("{response", id="unclosed"),
    ],
)
def test_prompt_template_rejected(template):
    from server.chat import check_prompt_template

    with pytest.raises(ValueError, match="template"):
        check_prompt_template(template)


def test_prompt_template_accepted():
    from server.chat import check_prompt_template

    template = "{conversation}\n{{literal}}\n{response}\n{conversation}"
    assert check_prompt_template(template) == template
