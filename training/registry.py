"""The adapter registry: immutable, content-hashed versions NAME@vN on any filesystem.

The root is a local directory or a URI that pyarrow (s3://, gs://, hdfs://, abfs://) or fsspec
opens, as Ray Train's own storage does. Layout:
ROOT/NAME/vN/{adapter_config.json, adapter_model.safetensors, metadata.json, MODEL_CARD.md}.

Object stores have no atomic directory rename, so publishing is three steps that work the same
on a local disk and on S3 (strong read-after-write consistency):
1. claim vN: write NAME/vN/.claims/<uuid>, then list the claims. The claim holds only if it is
   the only one: of two racing writers the later lister always sees the other, so at most one
   wins; a loser withdraws its claim and tries again. Winning claims stay, so no later writer
   can win vN.
2. write the adapter files and the model card into NAME/vN/.
3. commit: metadata.json, written last and moved into place whole. Only a vN with metadata.json
   is a version: a run that dies before step 3 leaves an invisible, never reused vN.
Serving refers to `NAME@vN`, never to "the latest files at a path"; replicas that need files
on local disk get a copy verified against the content hash (`local_dir`).
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.config import RegistryConfig, secret_value
from cluster.errors import NotFound, UserError
from training.local_model import ModelIdentity

_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,62})(?:@v(?P<version>\d+))?$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_CLAIM_ATTEMPTS = 20
_LIST_ATTEMPTS = 10


SCHEMA_VERSION = 2


class DatasetLineage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sha256: str
    rows: int
    paths: list[str] = []


class TrainingLineage(BaseModel):
    """Where an adapter came from: what a training run hands to `register`."""

    model_config = ConfigDict(extra="ignore")
    base_model: ModelIdentity
    dataset: DatasetLineage
    config: dict = Field(default_factory=dict, description="The run's TrainConfig, as written.")
    metrics: dict[str, float | int | bool] = Field(default_factory=dict)
    run_id: str
    author: str | None = Field(None, description="Who ran the training (four-eyes: never its approver).")
    trace_id: str | None = None
    created_at: float = Field(default_factory=time.time)


class AdapterRecord(TrainingLineage):
    """metadata.json of a version: its lineage plus identity. Files written before the schema
    had a version read as schema 1 (same fields)."""

    schema_version: int = 1
    name: str
    version: int
    ref: str
    content_hash: str


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    location: str  # the version's directory inside the registry's filesystem
    record: AdapterRecord

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def content_hash(self) -> str:
        return self.record.content_hash


def parse_ref(ref: str) -> tuple[str, int | None]:
    match = _REF.match(ref or "")
    if not match:
        raise UserError(f"invalid adapter reference {ref!r}: expected NAME or NAME@vN")
    version = match.group("version")
    return match.group("name"), int(version) if version else None


def redacted(uri: str) -> str:
    """The URI without credentials, for messages and logs."""
    uri = re.sub(r"(?<=://)[^/@]+@", "***@", uri)
    return re.sub(r"(?<=[?&])((?:access|secret)_key|session_token)=[^&\s]*", r"\1=***", uri)


def open_filesystem(uri: str | Path, access_key: str | None = None,
                    secret_key: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a pyarrow URI or an fsspec URI; keys, if
    given, are added to an s3:// URI's query (pyarrow's way to take them)."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    if access_key and uri.startswith("s3://"):
        from urllib.parse import quote

        query = f"access_key={quote(access_key, safe='')}&secret_key={quote(secret_key or '', safe='')}"
        uri = f"{uri}{'&' if '?' in uri else '?'}{query}"
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as first:  # pyarrow.ArrowInvalid is a ValueError
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError, OSError) as exc:
            raise UserError(redacted(f"registry.uri: cannot open {uri}: {first}; fsspec: {exc}")) from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class AdapterRegistry:
    def __init__(self, root: str | Path, cache_dir: Path | None = None, access_key: str | None = None,
                 secret_key: str | None = None):
        self.uri = str(root)
        self.fs, self.root = open_filesystem(root, access_key, secret_key)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "tunefetch-adapters"
        self._records: dict[tuple[str, int], AdapterRecord] = {}  # committed versions never change

    # -- writing -----------------------------------------------------------------------------
    def register(self, name: str, adapter_dir: Path, lineage: TrainingLineage) -> AdapterVersion:
        """Publishes a PEFT adapter directory as the next version of `name`."""
        parse_ref(name)
        adapter_dir = Path(adapter_dir)
        missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
        if missing:
            raise UserError(f"{adapter_dir} is not a PEFT adapter: missing {', '.join(missing)}")
        content_hash = files_hash(adapter_dir, ADAPTER_FILES)
        version, location = self._claim(name)
        record = AdapterRecord(**lineage.model_dump(include=set(TrainingLineage.model_fields)),
                               schema_version=SCHEMA_VERSION, name=name, version=version, ref=f"{name}@v{version}",
                               content_hash=content_hash)
        for file in ADAPTER_FILES:
            self._write(f"{location}/{file}", (adapter_dir / file).read_bytes())
        self._write(f"{location}/MODEL_CARD.md", model_card(record).encode())
        self._commit(location, record.model_dump_json(indent=2).encode())
        return AdapterVersion(name, version, location, record)

    def _claim(self, name: str) -> tuple[int, str]:
        for _ in range(_CLAIM_ATTEMPTS):
            version = max(self._taken(name), default=0) + 1
            location = f"{self.root}/{name}/v{version}"
            claim = f"{location}/.claims/{uuid.uuid4().hex}"
            if self.local:  # object stores have no directories to make
                self.fs.create_dir(f"{location}/.claims", recursive=True)
            self._write(claim, b"")
            claims = self._list(f"{location}/.claims")
            if [c.path for c in claims if c.type == pafs.FileType.File] == [claim] and not self._exists(f"{location}/metadata.json"):
                return version, location
            self.fs.delete_file(claim)
            time.sleep(random.uniform(0.01, 0.2))  # racing writers: spread the next attempt
        raise RuntimeError(f"could not claim a version of {name!r} after {_CLAIM_ATTEMPTS} attempts")

    def _commit(self, location: str, metadata: bytes) -> None:
        """metadata.json appears whole or not at all: written aside, then moved into place."""
        staged = f"{location}/.claims/metadata.json.{uuid.uuid4().hex}"
        self._write(staged, metadata)
        if self.local:  # the files of a local version are read-only, like the version itself
            for path in [*(Path(location) / f for f in (*ADAPTER_FILES, "MODEL_CARD.md")), Path(staged)]:
                path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        self.fs.move(staged, f"{location}/metadata.json")

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    # -- reading -----------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Entries under `path` (none if it does not exist). Racing writers withdraw claims and
        move staged files, and a local listing fails on an entry gone between readdir and stat:
        list again."""
        for attempt in range(_LIST_ATTEMPTS):
            try:
                return self.fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
            except FileNotFoundError:
                if attempt == _LIST_ATTEMPTS - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        return []

    def _files(self, name: str) -> list[tuple[int, str]]:
        """(N, path inside vN) of every file under NAME/vN/, in one listing."""
        entries = self._list(f"{self.root}/{name}", recursive=True)
        prefix = len(self.root) + len(name) + 2
        found = (re.fullmatch(r"v(\d+)/(.+)", e.path[prefix:]) for e in entries if e.type == pafs.FileType.File)
        return [(int(m.group(1)), m.group(2)) for m in found if m]

    def _taken(self, name: str) -> list[int]:
        """Versions committed or held by a claim: a claimed number is never handed out again.
        (Withdrawn claims leave no file, so a number every racer gave up is free again.)"""
        return [n for n, _ in self._files(name)]

    def versions(self, name: str) -> list[int]:
        """Committed versions of `name`, oldest first."""
        return sorted(n for n, path in self._files(name) if path == "metadata.json")

    def names(self) -> list[str]:
        entries = self._list(self.root)
        return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory
                      and _REF.fullmatch(e.base_name) and self.versions(e.base_name))

    def get(self, ref: str) -> AdapterVersion:
        """`NAME@vN` exactly, or `NAME` for its newest version."""
        name, version = parse_ref(ref)
        if (name, version) in self._records:  # an exact version seen before: no round trip
            return AdapterVersion(name, version, f"{self.root}/{name}/v{version}", self._records[name, version])
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"unknown adapter {name!r} (see `tunefetch adapters list`)")
        version = version if version is not None else versions[-1]
        if version not in versions:
            raise NotFound(f"adapter {name} has no version v{version}; versions: {', '.join(f'v{v}' for v in versions)}")
        location = f"{self.root}/{name}/v{version}"
        if (name, version) not in self._records:
            self._records[name, version] = self._read_record(location)
        return AdapterVersion(name, version, location, self._records[name, version])

    def _read_record(self, location: str) -> AdapterRecord:
        text = self.read_text(location, "metadata.json")
        try:
            return AdapterRecord.model_validate_json(text)
        except ValidationError as exc:
            raise UserError(f"{redacted(self.uri)}: {location}/metadata.json is not an adapter record "
                            f"({exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})") from None

    def all(self, unreadable: list[str] | None = None) -> list[AdapterVersion]:
        """Every version whose record reads; a damaged one (a half-written or corrupt
        metadata.json) is left out, with its reason appended to `unreadable`, so it never hides
        the others."""
        versions = []
        for ref in (f"{n}@v{v}" for n in self.names() for v in self.versions(n)):
            try:
                versions.append(self.get(ref))
            except (UserError, OSError) as exc:
                if unreadable is not None:
                    unreadable.append(f"{ref}: {exc}")
        return versions

    def read_text(self, location: str, file: str) -> str:
        with self.fs.open_input_stream(f"{location}/{file}") as src:
            return src.read().decode()

    def local_dir(self, version: AdapterVersion) -> Path:
        """A local directory with the version's files, for loaders that need one (peft, vLLM).
        Remote versions are copied once into the cache, verified against the content hash."""
        if self.local:
            return Path(version.location)
        target = self.cache_dir / version.name / f"v{version.version}-{version.content_hash[:16]}"
        if target.is_dir():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=self.cache_dir))
        try:
            for file in (*ADAPTER_FILES, "metadata.json", "MODEL_CARD.md"):
                with self.fs.open_input_stream(f"{version.location}/{file}") as src:
                    (staging / file).write_bytes(src.read())
            if files_hash(staging, ADAPTER_FILES) != version.content_hash:
                raise RuntimeError(f"{version.ref} in {redacted(self.uri)} does not match its content hash")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(target)  # another replica may have won the race: same bytes
            except OSError:
                if not target.is_dir():
                    raise
            return target
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def open_registry(settings: RegistryConfig) -> AdapterRegistry:
    """The registry a resolved registry section names (TunefetchConfig.registry_settings())."""
    return AdapterRegistry(settings.uri, cache_dir=settings.cache_dir, access_key=secret_value(settings.access_key),
                           secret_key=secret_value(settings.secret_key))


def files_hash(directory: Path, files: tuple[str, ...]) -> str:
    """sha256 over the names and bytes of `files` (the registry's content hash)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_card(record: AdapterRecord) -> str:
    hp = record.config
    lora = hp.get("lora", {})
    lines = [
        f"# Adapter {record.ref}",
        "",
        f"LoRA adapter for base model `{record.base_model.id}` (sha256 `{record.base_model.sha256[:16]}`).",
        "",
        "## Lineage",
        f"- content hash: `{record.content_hash}`",
        f"- training run: `{record.run_id}`; trace id: `{record.trace_id or '-'}`",
        f"- dataset: {record.dataset.rows} rows, sha256 `{record.dataset.sha256[:16]}`",
        f"- created: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record.created_at))}",
        "",
        "## Training",
        f"- LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, targets {', '.join(lora.get('target_modules', []))}",
        f"- DeepSpeed ZeRO-{hp.get('deepspeed', {}).get('zero_stage')}, {hp.get('scaling', {}).get('num_workers')} workers, "
        f"precision {hp.get('precision')}, lr {hp.get('optimizer', {}).get('lr')}",
        "",
        "## Metrics",
        *[f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(record.metrics.items())],
        "",
        "## Intended use and limits",
        "Behaviour and format adaptation for the datasets above. Facts that change belong in a",
        "knowledge store (retrieval), not in the adapter: retraining is needed to change what it learned.",
        "",
    ]
    return "\n".join(lines)
