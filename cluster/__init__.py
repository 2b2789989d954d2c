"""Shared plumbing: config, Ray runtime, telemetry, CLI, job submission."""
