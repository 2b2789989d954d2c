"""The Dockerfile the chart's default image is built from (no Docker engine runs here, so these
check what can go wrong without one: what it copies, what it installs, what the chart expects)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _ignored(path: str) -> bool:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)


def test_the_image_copies_every_package_and_build_file_and_nothing_ignored():
    copied = [src for line in DOCKERFILE.splitlines() if line.startswith("COPY ") and "--from" not in line
              for src in line.split()[1:-1]]
    for src in copied:
        assert (ROOT / src).exists() and not _ignored(src), src
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied), packages - set(copied)
    assert project["project"]["readme"] in copied  # `pip install -e .` reads it
    for state in (".venv", ".tunefetch", "tests"):
        assert _ignored(state)


def test_each_variant_installs_from_the_lock_make_uses():
    assert re.search(r'"\$VARIANT" = gpu \]; then make setup-gpu', DOCKERFILE)
    assert re.search(r'"\$VARIANT" = cpu \]; then .*make setup;', DOCKERFILE)
    assert "exit 1" in DOCKERFILE.split("RUN if")[1].split("\n\n")[0]  # any other variant fails the build


def test_the_charts_default_image_is_the_one_the_dockerfile_documents():
    chart = yaml.safe_load((ROOT / "helm" / "tunefetch" / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    values = yaml.safe_load((ROOT / "helm" / "tunefetch" / "values.yaml").read_text())
    assert f"tunefetch:{version}-{values['image']['variant']}" in DOCKERFILE
    assert f"tunefetch:{version}-gpu --build-arg VARIANT=gpu" in DOCKERFILE
