"""The HTTP contract: OpenAI request/response shapes, the `retrieval` extension, API errors."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered in the OpenAI shape {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code

    def __reduce__(self):  # raised in one replica, re-raised in the gateway: must pickle
        return APIError, (self.status, self.message, self.type, self.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kb: str
    top_k: int | None = Field(None, ge=1, le=50)
    filters: dict | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Overrides serving.rag.min_score.")
    no_context: Literal["abstain", "answer"] | None = Field(None, description="Overrides serving.rag.no_context.")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationParams(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=8192)
    min_tokens: int = Field(0, ge=0, le=8192, description="vLLM extension: tokens generated before a stop or EOS counts.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    retrieval: RetrievalOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return [v] if isinstance(v, str) else v


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_GenerationParams):
    prompt: str


class Citation(BaseModel):
    index: int
    doc_id: str
    chunk_id: str
    source: str
    section: str
    kb: str
    kb_version: int
    collection: str
    score: float


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def parse_request(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body as `model`; the first problem, with its field, as a 400."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"]) from None
