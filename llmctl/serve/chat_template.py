"""Chat templating for the server: messages to prompt token ids, on the tokenizer's thread.

The template is the model's, or the operator's (`llmctl serve --chat-template FILE`); a client
never supplies one. `chat_template_kwargs` pass only the variables documented templates read
(ALLOWED_TEMPLATE_KWARGS), never arguments of the call itself (`chat_template`, `tokenize`,
`conversation`, ...: vLLM's GHSA-6fvq-23cw-5628). The rendered text is bounded before it is
tokenized, and a template that refuses the messages (`raise_exception('...')`) is a 400 with
the template's own message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, InvalidRequestError
from llmctl.serve.protocol import ChatMessage

# Variables documented chat templates read (Qwen3's enable_thinking, gpt-oss's reasoning_effort,
# Llama 3.1's date_string, ...), plus the two request fields the call also takes.
ALLOWED_TEMPLATE_KWARGS = frozenset({
    "add_generation_prompt", "continue_final_message", "enable_thinking", "thinking", "reasoning_effort",
    "date_string",
})
MAX_KWARG_CHARS = 256
# A token rarely spans more than a few characters; 32 per token of context leaves room for long
# whitespace or code tokens and bounds the tokenizer's work before the context check.
MAX_RENDERED_CHARS_PER_TOKEN = 32


def load_chat_template(path: str | None) -> str | None:
    """The operator's template file, checked to compile (ConfigError at start, not per request)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"chat_template: cannot read {path} ({err})") from err
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat_template: {path} line {err.lineno}: {err.message}") from err
    return text


def check_text(text: str, param: str) -> str:
    """Text a tokenizer can take: a lone surrogate (valid JSON, invalid Unicode) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(f"{param}: not valid Unicode (a lone surrogate at character {err.start})") from err
    return text


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them; content parts joined to one text."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise InvalidRequestError(f"messages.{i}.content: only text parts are supported, "
                                              f"got {str(part.get('type'))[:40]!r}")
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise InvalidRequestError(f"messages.{i}.content: a text part's text must be a string")
                parts.append(text)
            content = "".join(parts)
        out.append({"role": check_text(m.role, f"messages.{i}.role"),
                    "content": check_text(content or "", f"messages.{i}.content")})
    return out


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The allowed chat_template_kwargs, each a JSON scalar; anything else is refused by name."""
    out: dict[str, Any] = {}
    for key, value in (kwargs or {}).items():
        if key not in ALLOWED_TEMPLATE_KWARGS:
            raise InvalidRequestError(f"chat_template_kwargs: {str(key)[:40]!r} is not accepted",
                                      hint=f"accepted: {', '.join(sorted(ALLOWED_TEMPLATE_KWARGS))}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise InvalidRequestError(f"chat_template_kwargs: {key} must be a string, number or boolean")
        if isinstance(value, str):
            check_text(value, f"chat_template_kwargs.{key}")
            if len(value) > MAX_KWARG_CHARS:
                raise InvalidRequestError(f"chat_template_kwargs: {key} is longer than {MAX_KWARG_CHARS} characters")
        out[key] = value
    return out


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                continue_final_message: bool, kwargs: dict[str, Any] | None, chat_template: str | None,
                max_model_len: int) -> list[int]:
    """Prompt token ids of a conversation. Blocking: the server calls it off the event loop."""
    import jinja2

    if not messages:
        raise InvalidRequestError("messages: must not be empty")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("messages: this model has no chat template; use /v1/completions")
    variables = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                 **template_kwargs(kwargs)}
    if variables["continue_final_message"]:
        variables["add_generation_prompt"] = False
    conversation = message_dicts(messages)
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False, **variables)
    except jinja2.TemplateError as err:
        raise InvalidRequestError(f"messages: the chat template refused them: {err}") from err
    except Exception as err:  # a template tripping over unusual input is the input's fault
        raise InvalidRequestError(f"messages: the chat template cannot render them ({type(err).__name__})") from err
    limit = max_model_len * MAX_RENDERED_CHARS_PER_TOKEN
    if not isinstance(text, str) or len(text) > limit:
        raise InvalidRequestError(f"messages: the chat template rendered more than {limit} characters "
                                  f"({MAX_RENDERED_CHARS_PER_TOKEN} per token of the {max_model_len}-token context)")
    # The template already wrote any BOS, so do not add special tokens again (as vLLM).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
