"""The Python client of the tunefetch HTTP API (what `tunefetch query`, the demo and
`tunefetch eval compare` use; any OpenAI client works too)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from cluster.errors import NotFound, UserError


class ServerUnavailable(UserError):
    """Nothing answers at the server's address."""


class Unauthorized(UserError):
    """The server wants an API key (client.api_key) that was not sent or is not valid."""


@dataclass
class Answer:
    model: str  # exactly what answered: the base model id or NAME@vN
    text: str
    citations: list[dict]
    provenance_id: str
    trace_id: str | None
    usage: dict
    grounded: bool | None = None  # None: no retrieval asked
    abstained: bool = False
    attribution: dict | None = None  # cite strict: each citation's quote, verified against its passage


class Client:
    def __init__(self, url: str, timeout_s: float = 120.0, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    @classmethod
    def for_config(cls, config, url: str | None = None) -> "Client":
        """A client of the server `config` describes (or `url`), sending client.api_key if set."""
        from cluster.config import secret_value

        return cls(url or config.server_url, api_key=secret_value(config.client.api_key))

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models").json()["data"]

    def base_model(self) -> str:
        return next(m["id"] for m in self.models() if m["parent"] is None)

    def chat(self, question: str, model: str, kb: str | None = None, top_k: int | None = None,
             filters: dict | None = None, max_tokens: int | None = None, temperature: float = 0.0,
             cite: bool = False) -> Answer:
        body: dict = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": temperature}
        if max_tokens:
            body["max_tokens"] = max_tokens
        if kb:
            body["retrieval"] = {"kb": kb, **({"top_k": top_k} if top_k else {}), **({"filters": filters} if filters else {}),
                                 **({"cite": "strict"} if cite else {})}
        response = self._call("POST", "/v1/chat/completions", json=body)
        data = response.json()
        traceparent = response.headers.get("traceparent", "")
        return Answer(
            model=data["model"],
            text=data["choices"][0]["message"]["content"],
            citations=data.get("citations", []),
            provenance_id=data["provenance_id"],
            trace_id=traceparent.split("-")[1] if traceparent.count("-") == 3 else None,
            usage=data.get("usage", {}),
            grounded=data.get("grounded"),
            abstained=bool(data.get("abstained", False)),
            attribution=(data.get("attribution") or [None])[0],
        )

    def retrieve(self, query: str, kb: str, top_k: int | None = None, filters: dict | None = None) -> dict:
        """The passages retrieval finds, without generation (`POST /v1/retrieve`)."""
        retrieval = {"kb": kb, **({"top_k": top_k} if top_k else {}), **({"filters": filters} if filters else {})}
        return self._call("POST", "/v1/retrieve", json={"query": query, "retrieval": retrieval}).json()

    def system_card(self) -> dict:
        """The running deployment's card facts and their hash (`GET /v1/admin/card`)."""
        return self._call("GET", "/v1/admin/card").json()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ServerUnavailable(f"no tunefetch server at {self.url} (start one with `tunefetch serve`)") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            error = {404: NotFound, 401: Unauthorized}.get(response.status_code, UserError)
            raise error(f"server answered {response.status_code}: {message}")
        return response
