"""The prompt template (`data.prompt_template`) and the chat-template variables (`data.chat_template_kwargs`)."""

from __future__ import annotations

from typing import Any

from kpo_lightning.errors import UserInputError

# apply_chat_template arguments the data module sets itself: data.chat_template_kwargs may not override them.
RESERVED_CHAT_KWARGS = (
    "conversation",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_tensors",
    "padding",
    "truncation",
    "max_length",
    "tokenizer_kwargs",
    "return_assistant_tokens_mask",
    "chat_template",
)


def _check_chat_template_kwargs(kwargs: Any) -> None:
    """data.chat_template_kwargs: a mapping of template variable names (not the arguments we set ourselves)."""
    if not isinstance(kwargs, dict):
        raise UserInputError(
            f"data.chat_template_kwargs={kwargs!r} is invalid: give a mapping, e.g. {{enable_thinking: false}}"
        )
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise UserInputError(
                f"data.chat_template_kwargs has the key {key!r}: keys are chat template variable names "
                "(identifiers such as enable_thinking)"
            )
        if key in RESERVED_CHAT_KWARGS:
            raise UserInputError(
                f"data.chat_template_kwargs.{key} is set by the data module itself (prompts are templated as text "
                f"with add_generation_prompt=true); remove it"
            )


def _apply_template(template: str, text: str) -> str:
    """`template.format(prompt=text)`, with a fixable message for stray braces or a missing {prompt}."""
    try:
        out = template.format(prompt=text)
    except (KeyError, IndexError, ValueError) as e:
        raise UserInputError(
            f"data.prompt_template={template!r} cannot be formatted ({type(e).__name__}: {e}): it may use only "
            f"{{prompt}}; write literal braces as {{{{ and }}}} (e.g. \\boxed{{{{}}}})"
        ) from None
    return out
