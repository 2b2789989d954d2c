"""The HTTP contract: OpenAI request/response shapes, the `retrieval` extension, API errors."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class APIError(Exception):
    """An error answered in the OpenAI shape {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.retry_after_s = retry_after_s  # 429/503: when a retry may succeed (Retry-After)

    def __reduce__(self):  # raised in one replica, re-raised in the gateway: must pickle
        return APIError, (self.status, self.message, self.type, self.code, self.retry_after_s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


def as_api_error(exc: Exception) -> APIError:
    """Errors raised in other replicas arrive wrapped; keep their status and message. Overload
    is 429 and a missing or dying replica 503: both are worth a retry (Retry-After)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, APIError) or hasattr(exc, "status") and hasattr(exc, "message"):
        return APIError(exc.status, exc.message, getattr(exc, "type", "invalid_request_error"), getattr(exc, "code", None),
                        getattr(exc, "retry_after_s", None))
    if isinstance(exc, BackPressureError):
        return APIError(429, "the server is at capacity: retry shortly", "rate_limit_error", code="server_overloaded")
    if isinstance(exc, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        return APIError(503, "the model server is unavailable: retry shortly", "server_error", code="service_unavailable")
    return APIError(500, f"internal error: {exc.__class__.__name__}", "server_error")


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kb: str
    top_k: int | None = Field(None, ge=1, le=50)
    filters: dict | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Overrides serving.rag.min_score.")
    no_context: Literal["abstain", "answer"] | None = Field(None, description="Overrides serving.rag.no_context.")
    on_unavailable: Literal["fail", "answer"] | None = Field(None, description="Overrides serving.rag.on_unavailable.")
    cite: Literal["strict"] | None = Field(
        None, description="strict: the answer is JSON {answer, citations: [{id, quote}]} whose ids can only be the "
                          "numbers of the passages retrieved for this request; quotes are checked verbatim against "
                          "those passages.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _is_a_schema(cls, schema: dict) -> dict:
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a JSON schema: {exc.message}") from None
        return schema


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: decoding is constrained by vLLM's grammar backend (xgrammar)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self

    def grammar(self) -> dict | None:
        """vLLM's structured-output fields for this format (None: free text)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            return {"json": self.json_schema.schema_}
        return None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        """OpenAI clients may send content as parts: text parts are joined, others rejected."""
        if isinstance(v, str):
            return v
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, not {str(part.get('type'))[:40]!r}")
        return "".join(part["text"] for part in v)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationParams(BaseModel):
    # An OpenAI parameter this server does not implement is an error that names it, never a
    # silent drop; one sent with an empty value (null, false, [], {}) asks for nothing and passes.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192, description="OpenAI's newer name for max_tokens.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    min_tokens: int = Field(0, ge=0, le=8192, description="vLLM extension: tokens generated before a stop or EOS counts.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = None
    retrieval: RetrievalOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @model_validator(mode="before")
    @classmethod
    def _unused_extras(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k in cls.model_fields or v not in (None, False, [], {})}
        return data

    @model_validator(mode="after")
    def _cite_needs_free_text(self):
        if self.retrieval and self.retrieval.cite and self.response_format and self.response_format.type == "json_object":
            raise ValueError("retrieval.cite 'strict' answers in its own JSON shape: send response_format json_schema "
                             "(it becomes the `answer` part) or none")
        return self

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: send one")
            self.max_tokens = self.max_completion_tokens
        return self


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_GenerationParams):
    prompt: str


class RetrieveRequest(BaseModel):
    """POST /v1/retrieve: the hits alone, with the `retrieval` object chat requests take."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(..., min_length=1, max_length=8000)
    retrieval: RetrievalOptions


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
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"parameter {where!r} is not supported by this server", code="unsupported_parameter") from None
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"]) from None


def openapi(app) -> dict:
    """The app's OpenAPI schema with the request bodies its handlers parse themselves (they
    read raw bytes to size-check them first) and the Bearer scheme API keys use."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    from serving.feedback import FeedbackRequest

    for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
                        ("/v1/feedback", FeedbackRequest), ("/v1/retrieve", RetrieveRequest)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        models.update(body.pop("$defs", {}))
        models[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"apiKey": []}, {}]  # required once any key exists
    app.openapi_schema = schema
    return schema
