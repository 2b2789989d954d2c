"""`python -m tunefetch.smoke URL`: is a deployed server answering? (the chart's `helm test`)

/healthz must answer 200; /v1/models must list the base model with the key in
TUNEFETCH_CLIENT__API_KEY, or, without a key, answer 200 (no keys in force) or 401 (keys in
force: nothing more can be checked). One line per check; exit 1 on the first failure.
"""

from __future__ import annotations

import os
import sys

import httpx


def check(url: str, token: str | None, timeout_s: float = 30.0) -> list[str]:
    """Runs the checks against `url`; returns what passed, raises AssertionError on a failure."""
    passed = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        health = client.get("/healthz")
        assert health.status_code == 200, f"/healthz answered {health.status_code}: {health.text[:200]}"
        passed.append("/healthz 200")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        models = client.get("/v1/models", headers=headers)
        if models.status_code == 401 and not token:
            passed.append("/v1/models 401 without a key (API keys are in force)")
            return passed
        assert models.status_code == 200, f"/v1/models answered {models.status_code}: {models.text[:200]}"
        ids = [m["id"] for m in models.json()["data"]]
        assert ids, "/v1/models lists no model"
        passed.append(f"/v1/models 200: {len(ids)} models ({ids[0]} first)")
    return passed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tunefetch.smoke URL", file=sys.stderr)
        return 2
    try:
        for line in check(argv[0], os.environ.get("TUNEFETCH_CLIENT__API_KEY") or None):
            print(f"ok: {line}")
    except (AssertionError, httpx.HTTPError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
