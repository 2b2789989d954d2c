"""Versioned knowledge stores: atomic switches, interrupted ingests, incremental re-ingest,
retention, and readers during a switch. Driven through the CLI, checked through the Python API."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import CLI, ROOT, TUNEFETCH

STORE = "scratch"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """400 small generated policy documents (~1,200 chunks): long enough to interrupt."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(400):
        body = "\n\n".join(f"Rule {i}.{j}: shipments to depot {i * 7 + j} leave on weekday {j % 5} "
                           f"and need form K-{i:03d}-{j} signed by the site lead." * 3 for j in range(3))
        (root / f"policy-{i:03d}.md").write_text(f"# Policy {i}\n\n## Shipping\n\n{body}\n")
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for name, text in {"alpha": "Alpha robots charge at dock A.", "beta": "Beta robots charge at dock B.",
                       "gamma": "Gamma robots charge at dock C."}.items():
        (root / f"{name}.md").write_text(f"# {name.title()}\n\n## Charging\n\n{text}\n")
    return root


@pytest.fixture(scope="module")
def stores(cli):
    """The Python API on the suite's home (shares the Milvus Lite server with the CLI)."""
    from cluster.config import load_config
    from retrieval.milvus_endpoint import milvus_endpoint
    from retrieval.store import KnowledgeStores

    with milvus_endpoint(load_config(home=cli.home)) as address:
        yield KnowledgeStores(address)


@pytest.fixture(scope="module")
def embed():
    from retrieval.embedding import Embedder

    embedder = Embedder()
    return lambda text: embedder.encode([text])[0]


def collections(stores, name: str) -> list[str]:
    return sorted(c for c in stores.client.list_collections() if c.startswith(f"{name}__v"))


def ingest_until_writing(cli: CLI, path: Path, name: str) -> subprocess.Popen:
    """Starts `tunefetch ingest` and returns once it has written its first batch (its progress
    line on stderr says so)."""
    proc = subprocess.Popen([TUNEFETCH, "ingest", str(path), "--kb", name, "--home", str(cli.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stderr:
        if f"ingest {name}: " in line:
            return proc
    raise AssertionError(f"ingest ended before writing: {proc.wait()} {proc.stdout.read()}")


def test_interrupted_ingest_leaves_the_serving_version_untouched(cli, stores, small, corpus):
    first = cli("ingest", str(small), "--kb", STORE).stdout.strip().splitlines()[-1]
    proc = ingest_until_writing(cli, corpus, STORE)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert "interrupted" in proc.stderr.read()
    assert proc.stdout.read() == ""  # no result: nothing was ingested
    assert stores.current(STORE)[1] == int(first.split("@v")[1])
    assert collections(stores, STORE) == [f"{STORE}__v{first.split('@v')[1]}"]  # partial one dropped


def test_killed_ingest_is_cleaned_up_by_the_next_one(cli, stores, small, corpus):
    before = stores.current(STORE)
    proc = ingest_until_writing(cli, corpus, STORE)
    proc.kill()
    proc.wait()
    partial = [c for c in collections(stores, STORE) if c != before[0]]
    assert len(partial) == 1  # a SIGKILL leaves the collection, marked "writing"
    assert stores.current(STORE) == before
    assert partial[0] not in [v.collection for v in stores.versions(STORE)]
    cli("ingest", str(small), "--kb", STORE)
    assert partial[0] not in collections(stores, STORE)


def test_incremental_ingest_reuses_unchanged_chunks(cli, stores, small, tmp_path, embed):
    out = cli("ingest", str(small), "--kb", STORE).stderr
    assert "(0 embedded, 3 reused)" in out
    changed = tmp_path / "changed"
    changed.mkdir()
    for doc in small.glob("*.md"):
        if doc.stem != "gamma":  # gamma is deleted
            text = doc.read_text().replace("dock A", "dock Z")
            (changed / doc.name).write_text(text)
    out = cli("ingest", str(changed), "--kb", STORE).stderr
    assert "(1 embedded, 1 reused)" in out  # alpha changed, beta unchanged
    assert "2 chunks" in out
    hits = stores.search(STORE, embed("Where do alpha robots charge?"), 5).hits
    assert {h.doc_id for h in hits} == {"alpha", "beta"}
    assert "dock Z" in next(h.text for h in hits if h.doc_id == "alpha")
    full = cli("ingest", str(changed), "--kb", STORE, "--full")
    assert "(2 embedded, 0 reused)" in full.stderr and full.stdout == f"{STORE}@v{stores.current(STORE)[1]}\n"


def test_retention_keeps_the_newest_versions(cli, stores, small, tmp_path):
    config = tmp_path / "keep.yaml"
    config.write_text(yaml.safe_dump({"retrieval": {"keep_versions": 2}}))
    keep = CLI(cli.home, config)
    for _ in range(3):
        last = keep("ingest", str(small), "--kb", STORE).stdout.strip().splitlines()[-1]
    versions = stores.versions(STORE)
    assert [f"{STORE}@v{v.version}" for v in versions][-1] == last
    assert len(versions) == 2 and versions[-1].current


def test_readers_see_one_whole_version_during_a_switch(cli, stores, small, corpus, embed):
    """Searches running while a new version is written and switched: each answer comes from
    exactly one version, and versions only move forward."""
    cli("ingest", str(small), "--kb", STORE)
    query = embed("shipments to depot and form signatures")
    seen: list[tuple[int, set[int]]] = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            result = stores.search(STORE, query, 10)
            seen.append((result.kb_version, {h.kb_version for h in result.hits}))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        cli("ingest", str(corpus), "--kb", STORE)
    finally:
        done.set()
        thread.join()
    assert len({v for v, _ in seen}) == 2, "the reader should have seen the old and the new version"
    for version, hit_versions in seen:
        assert hit_versions == {version}
    order = [v for v, _ in seen]
    assert order == sorted(order)


def test_a_dropped_version_number_is_never_handed_out_again(stores, small):
    """Dropping the newest version (a trial version after a rollback) must not free its number:
    readers, loaded-collection sets and the retrieval cache know versions by collection name."""
    from cluster.config import RetrievalConfig
    from retrieval.embedding import Embedder
    from retrieval.ingest import ingest

    embedder, name = Embedder(), "renumbered"

    def new_version() -> int:
        return ingest([str(small)], name, stores, embedder, RetrievalConfig(), incremental=False).version.version

    assert [new_version() for _ in range(3)] == [1, 2, 3]
    stores.rollback(name, 2)
    stores.drop_version(name, 3)
    stores.rollback(name, 1)  # the mark is on v2 now, and still counts
    assert new_version() == 4
    stores.rollback(name, 1)
    stores.drop_version(name, 4)
    stores.drop_version(name, 2)  # only v1 is left: its mark alone says 5
    assert new_version() == 5
