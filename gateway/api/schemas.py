"""Request bodies of the OpenAI routes, validated before anything reaches an engine.

Only what the gateway relies on is checked strictly; every other field is kept as sent (`extra="allow"`)
and left for vLLM to judge, so new OpenAI/vLLM parameters (`tools`, `tool_choice`, `response_format`, ...)
pass through without a gateway release.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator


class InferenceParams(BaseModel):
    """What every inference body shares, and all the gateway itself reads of it."""

    model_config = ConfigDict(extra="allow", strict=False)

    #: The fields that bound the tokens of one answer: each is capped by `max_output_tokens` and by a
    #: key's `max_tokens`; the first one is where a key's `max_tokens` goes when the request sets none.
    TOKEN_FIELDS: ClassVar[tuple[str, ...]] = ("max_tokens",)

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)

    def prompt_count(self) -> int:
        """Prompts in this request: vLLM runs each `choices()` times."""
        return 1

    def choices(self) -> int:
        """Completions asked for per prompt (`n`)."""
        return 1

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for a field set to something this gateway cannot serve; None when all can be."""
        return None

    def prepare(self, payload: dict[str, Any]) -> bool:
        """What the engine's body needs changed for this route; True when `payload` changed."""
        return False

    @field_validator("stream", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool) and value is not None:
            raise ValueError("must be true or false")
        return False if value is None else value


class CompletionParams(InferenceParams):
    """What chat and text completions share."""

    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    stream_options: dict[str, Any] | None = None

    def choices(self) -> int:
        return self.n


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class ChatCompletionRequest(CompletionParams):
    """`tools`, `tool_choice` and `response_format` pass through as sent, like every field not declared
    here: vLLM judges them (a named or `required` `tool_choice` needs its `--tool-call-parser`, `auto`
    also `--enable-auto-tool-choice`: `engine.tool_call_parser`)."""

    TOKEN_FIELDS: ClassVar[tuple[str, ...]] = ("max_tokens", "max_completion_tokens")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(CompletionParams):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompt_count(self) -> int:
        """A string or a list of token ids is one prompt; a list of them is one each."""
        prompt = self.prompt
        return 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value


#: Responses API fields that need state kept by one engine process (vLLM keeps stored responses in its
#: memory): behind a gateway with several engines, or after a restart, the next request would not find it.
STATEFUL_RESPONSE_FIELDS = {
    "previous_response_id": "vLLM keeps earlier responses in the memory of one engine process, so behind "
    "this gateway a follow-up may reach another engine (or a restarted one) that never saw it; send the "
    "conversation so far in `input` instead.",
    "conversation": "conversations are kept by no engine behind this gateway; send the conversation so far "
    "in `input` instead.",
    "background": "a background response is fetched later from the engine process that ran it, which "
    "this gateway does not route to; stream it instead.",
}


class ResponsesRequest(InferenceParams):
    """OpenAI's Responses API (`POST /v1/responses`), served by vLLM's own Responses route. Stateless only:
    nothing is stored (the engine gets `store: false`), and `previous_response_id`, `conversation` and
    `background: true` are refused (400 `unsupported_parameter`)."""

    TOKEN_FIELDS: ClassVar[tuple[str, ...]] = ("max_output_tokens",)

    input: str | list[dict[str, Any]] = Field(
        description='A string, or a list of input items (`{"role": "user", "content": ...}`, ...).'
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool | None = Field(
        None, description="Accepted, never honoured: responses are not stored (the engine gets false)."
    )
    previous_response_id: str | None = Field(None, description="Refused when set (400).")
    background: bool | None = Field(None, description="Refused when true (400).")

    def unsupported(self) -> tuple[str, str] | None:
        extra = self.model_extra or {}
        for field, why in STATEFUL_RESPONSE_FIELDS.items():
            value = getattr(self, field, None) if field in type(self).model_fields else extra.get(field)
            if value is not None and value is not False:
                return field, f"'{field}' is not supported by this gateway: {why}"
        return None

    def prepare(self, payload: dict[str, Any]) -> bool:
        """Never stored: a response kept in one engine's memory could not be found again through the
        gateway (and vLLM never frees what it stores)."""
        if payload.get("store") is False:
            return False
        payload["store"] = False
        return True

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value
