"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): generated valid and invalid
requests against every operation, a bounded budget, no 5xx, no hang, and the server still
answers afterwards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

EXAMPLES = 25  # per operation and phase: ~900 requests, ~30 s here
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def test_the_openapi_schema_documents_the_request_bodies_and_the_key_scheme(server):
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages", "max_tokens", "max_completion_tokens", "retrieval"} <= set(chat["properties"])
    assert chat["additionalProperties"] is False
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_fuzzing_every_operation_finds_no_server_error(server, tmp_path):
    proc = subprocess.run(
        [SCHEMATHESIS, "run", f"{server}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
         str(EXAMPLES), "--seed", "1", "--request-timeout", "60", "--generation-database", "none", "--workers", "2",
         "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert proc.returncode == 0 and summary, proc.stdout[-4000:]
    generated, passed = map(int, summary.groups())
    assert generated == passed >= 500, proc.stdout[-2000:]
    print(f"fuzz: {generated} cases, all passed")
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200
    response = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 200, response.text
