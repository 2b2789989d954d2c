"""The adapter registry: immutable, content-hashed versions NAME@vN.

Layout: ROOT/NAME/vN/{adapter_config.json, adapter_model.safetensors, metadata.json, MODEL_CARD.md}.
A version is assembled in a hidden staging directory and renamed into place in one step, so a
half-written version is never visible and two concurrent runs never get the same N. Files are
made read-only; serving refers to `NAME@vN`, never to "the latest files at a path".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import NotFound, UserError
from training.local_model import directory_hash

_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,62})(?:@v(?P<version>\d+))?$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    path: Path
    metadata: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def content_hash(self) -> str:
        return self.metadata["content_hash"]


def parse_ref(ref: str) -> tuple[str, int | None]:
    match = _REF.match(ref or "")
    if not match:
        raise UserError(f"invalid adapter reference {ref!r}: expected NAME or NAME@vN")
    version = match.group("version")
    return match.group("name"), int(version) if version else None


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def register(self, name: str, adapter_dir: Path, metadata: dict) -> AdapterVersion:
        """Copies a PEFT adapter directory in as the next version of `name`."""
        parse_ref(name)
        missing = [f for f in ADAPTER_FILES if not (Path(adapter_dir) / f).is_file()]
        if missing:
            raise UserError(f"{adapter_dir} is not a PEFT adapter: missing {', '.join(missing)}")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root / name))
        try:
            for file in ADAPTER_FILES:
                shutil.copy2(Path(adapter_dir) / file, staging / file)
            content_hash = directory_hash(staging)
            return self._publish(name, staging, {**metadata, "content_hash": content_hash})
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, name: str, staging: Path, metadata: dict) -> AdapterVersion:
        while True:
            version = max(self.versions(name), default=0) + 1
            record = {**metadata, "name": name, "version": version, "ref": f"{name}@v{version}",
                      "created_at": metadata.get("created_at") or time.time()}
            (staging / "metadata.json").write_text(json.dumps(record, indent=2, sort_keys=True))
            (staging / "MODEL_CARD.md").write_text(model_card(record))
            for file in staging.iterdir():
                file.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            target = self.root / name / f"v{version}"
            try:
                os.rename(staging, target)  # atomic; fails if another run took vN first
            except OSError:
                if target.exists():
                    continue
                raise
            return AdapterVersion(name, version, target, record)

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in folder.iterdir() if re.fullmatch(r"v\d+", p.name))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def get(self, ref: str) -> AdapterVersion:
        """`NAME@vN` exactly, or `NAME` for its newest version."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"unknown adapter {name!r} (see `tunefetch adapters list`)")
        version = version if version is not None else versions[-1]
        if version not in versions:
            raise NotFound(f"adapter {name} has no version v{version}; versions: {', '.join(f'v{v}' for v in versions)}")
        path = self.root / name / f"v{version}"
        return AdapterVersion(name, version, path, json.loads((path / "metadata.json").read_text()))

    def all(self) -> list[AdapterVersion]:
        return [self.get(f"{n}@v{v}") for n in self.names() for v in self.versions(n)]


def model_card(record: dict) -> str:
    metrics = record.get("metrics", {})
    hp = record.get("config", {})
    lora = hp.get("lora", {})
    lines = [
        f"# Adapter {record['ref']}",
        "",
        f"LoRA adapter for base model `{record.get('base_model', {}).get('id', '?')}` "
        f"(sha256 `{record.get('base_model', {}).get('sha256', '?')[:16]}`).",
        "",
        "## Lineage",
        f"- content hash: `{record.get('content_hash', '?')}`",
        f"- training run: `{record.get('run_id', '?')}`; trace id: `{record.get('trace_id') or '-'}`",
        f"- dataset: {record.get('dataset', {}).get('rows', '?')} rows, sha256 `{record.get('dataset', {}).get('sha256', '?')[:16]}`",
        f"- created: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record.get('created_at', 0)))}",
        "",
        "## Training",
        f"- LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, targets {', '.join(lora.get('target_modules', []))}",
        f"- DeepSpeed ZeRO-{hp.get('deepspeed', {}).get('zero_stage')}, {hp.get('scaling', {}).get('num_workers')} workers, "
        f"precision {hp.get('precision')}, lr {hp.get('optimizer', {}).get('lr')}",
        "",
        "## Metrics",
        *[f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())],
        "",
        "## Intended use and limits",
        "Behaviour and format adaptation for the datasets above. Facts that change belong in a",
        "knowledge store (retrieval), not in the adapter: retraining is needed to change what it learned.",
        "",
    ]
    return "\n".join(lines)
