"""Request bodies of the OpenAI routes, validated before anything reaches an engine.

Only what the gateway relies on is checked strictly; every other field is kept as sent (`extra="allow"`)
and left for vLLM to judge, so new OpenAI/vLLM parameters pass through without a gateway release.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CompletionParams(BaseModel):
    """What chat and text completions share, and all the gateway itself reads."""

    model_config = ConfigDict(extra="allow", strict=False)

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream_options: dict[str, Any] | None = None

    def prompt_count(self) -> int:
        """Prompts in this request: vLLM runs each `n` times."""
        return 1

    @field_validator("stream", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool) and value is not None:
            raise ValueError("must be true or false")
        return False if value is None else value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class ChatCompletionRequest(CompletionParams):
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
