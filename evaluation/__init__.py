"""Tune or fetch, measured: base vs RAG vs fine-tuned vs hybrid answers on held-out questions,
retrieval and generation tracks, and freshness after a knowledge update. A client of the HTTP API
and the knowledge stores; it never imports serving."""
