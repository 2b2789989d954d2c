"""The ground every layer stands on: config, errors, Ray runtime, telemetry, job submission.

Imports nothing above it (tests/test_architecture.py)."""
