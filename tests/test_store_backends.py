"""The knowledge store API against both backends: Milvus Lite (embedded default) and a real
Milvus standalone server (milvus==2.3.5, started and stopped completely by this module)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from cluster.errors import NotFound, UserError
from retrieval.chunking import Chunk
from retrieval.milvus_endpoint import MilvusAddress
from retrieval.store import KnowledgeStores

_SERVER_PORTS = ("etcd-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
                 "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")


def _wait_for(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            MilvusClient(uri=uri, timeout=2).list_collections()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus at {uri} not up after {timeout_s} s")
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    # milvus-server's child ignores SIGTERM to the wrapper: kill the whole process group.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["milvus-lite", "milvus-server"])
def stores(request, tmp_path_factory):
    data = tmp_path_factory.mktemp(request.param)
    log = data / "server.log"
    if request.param == "milvus-lite":
        port = free_port()
        argv = [sys.executable, "-m", "milvus_lite.cmdline", "server", "--data-dir", str(data / "store.db"),
                "--host", "127.0.0.1", "--port", str(port)]
    else:
        ports = {name: free_port() for name in _SERVER_PORTS}
        port = ports["proxy-port"]
        argv = [str(Path(sys.executable).parent / "milvus-server"), "--data", str(data)]
        argv += [arg for name, p in ports.items() for arg in (f"--{name}", str(p))]
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for(uri, proc, log)
        yield KnowledgeStores(MilvusAddress(uri))
    finally:
        _stop(proc)
        leftovers = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout.split()
        assert not [pid for pid in leftovers if _is_running(int(pid))], f"processes left behind: {leftovers}"
        shutil.rmtree(data, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def corpus(n: int = 60, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(f"{i:032x}", f"doc-{i % 4}", f"text {i}", f"Doc {i % 4} > Part", f"file:///doc-{i % 4}.md", f"h{i}")
              for i in range(n)]
    return chunks, vectors


def write(stores, name, chunks, vectors, keep=0, embedder="test"):
    with stores.new_version(name, vectors.shape[1], embedder, documents=4, sources=[], keep=keep) as writer:
        writer.insert(chunks, vectors)
    return writer.info


def test_versions_switch_and_roll_back(stores):
    chunks, vectors = corpus()
    v1 = write(stores, "handbook", chunks, vectors)
    v2 = write(stores, "handbook", chunks[:10], vectors[:10])
    assert (v1.version, v2.version) == (1, 2) and stores.current("handbook") == ("handbook__v2", 2)
    result = stores.search("handbook", vectors[3], 5)
    assert result.kb_version == 2 and all(h.kb_version == 2 for h in result.hits)
    assert stores.rollback("handbook").version == 1
    hit = stores.search("handbook", vectors[42], 1).hits[0]
    assert (hit.chunk_id, hit.kb_version, hit.collection) == (chunks[42].chunk_id, 1, "handbook__v1")
    assert [v.current for v in stores.versions("handbook")] == [True, False]
    with pytest.raises(UserError, match="no version v7"):
        stores.rollback("handbook", to=7)
    with pytest.raises(NotFound):
        stores.search("nothere", vectors[0], 1)


def test_filters_and_injection(stores):
    chunks, vectors = corpus()
    write(stores, "filtered", chunks, vectors)
    hits = stores.search("filtered", vectors[0], 20, {"doc_id": ["doc-1", "doc-2"]}).hits
    assert hits and {h.doc_id for h in hits} == {"doc-1", "doc-2"}
    assert stores.search("filtered", vectors[0], 20, {"doc_id": 'doc-1" or doc_id != "x'}).hits == []
    ranged = stores.search("filtered", vectors[0], 20, {"kb_version": {"gte": 1, "lt": 2}}).hits
    assert len(ranged) == 20
    with pytest.raises(UserError):
        stores.search("filtered", vectors[0], 5, {"text": "x"})


def test_failed_write_leaves_the_alias_and_no_collection(stores):
    chunks, vectors = corpus()
    write(stores, "atomic", chunks, vectors)
    with pytest.raises(RuntimeError, match="boom"):
        with stores.new_version("atomic", vectors.shape[1], "test", documents=4, sources=[]) as writer:
            writer.insert(chunks[:5], vectors[:5])
            raise RuntimeError("boom")
    assert stores.current("atomic") == ("atomic__v1", 1)
    assert "atomic__v2" not in stores.client.list_collections()


def test_abandoned_writes_are_dropped_and_retention_applies(stores):
    chunks, vectors = corpus()
    write(stores, "kept", chunks, vectors)
    from retrieval.store import StoreVersionRecord, Writer

    dead_writer = Writer(pid=2**22 + 12345, host=os.uname().nodename)  # a pid no process has
    stores._create_collection("kept__v2", vectors.shape[1],
                              StoreVersionRecord(version=2, created_at=0, state="writing", writer=dead_writer))
    assert [v.version for v in stores.versions("kept")] == [1]  # a half-written version is invisible
    for _ in range(3):
        write(stores, "kept", chunks, vectors, keep=2)
    assert "kept__v2" not in stores.client.list_collections()
    assert [v.version for v in stores.versions("kept")] == [4, 5]  # numbers are never reused


def test_unchanged_chunks_are_reusable_only_with_the_same_embedder(stores):
    chunks, vectors = corpus()
    write(stores, "reuse", chunks, vectors, embedder="model-a")
    found = stores.reusable_vectors("reuse", [c.chunk_id for c in chunks[:5]] + ["f" * 32], "model-a")
    assert set(found) == {c.chunk_id for c in chunks[:5]}
    assert np.allclose(found[chunks[2].chunk_id], vectors[2], atol=1e-6)
    assert stores.reusable_vectors("reuse", [chunks[0].chunk_id], "model-b") == {}
