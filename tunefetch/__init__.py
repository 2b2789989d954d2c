"""tunefetch: tune behaviour into LoRA adapters, fetch knowledge from versioned stores, serve both.

The face of the project: the `tunefetch` CLI and the Python client of its HTTP API.

    from tunefetch import Client
    answer = Client("http://127.0.0.1:8000").chat("How long is the warranty?", model="support", kb="kestrel")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tunefetch")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name in ("Client", "Answer"):  # imported on first use: `tunefetch --help` stays fast
        from tunefetch import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["Client", "Answer", "__version__"]
