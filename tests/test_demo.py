"""`tunefetch demo`, the main job, end to end in its own home, read as a newcomer reads it."""

from __future__ import annotations

import re
import shutil
import subprocess

from conftest import CLI, free_port


def test_demo_stages_answers_and_a_quiet_terminal(tmp_path_factory, local_model):
    home = tmp_path_factory.mktemp("demo-home")
    # The session's local model (built once, ~minutes): the demo must reuse a model it finds.
    shutil.copytree(local_model, home / "models" / "tiny-llama")
    proc = CLI(home)("demo", "--port", str(free_port()))
    out, err = proc.stdout, proc.stderr
    for stage in ("1/5 local model", "2/5 ingest", "3/5 fine-tune", "4/5 serve", "5/5 ask"):
        assert f"==> {stage}" in err, err
    assert "kestrel@v1" in err and "registered support@v1" in err
    # Framework output went to the log file the demo named, not to the terminal.
    log = re.search(r"framework output goes to (\S+)", err).group(1)
    assert "(RayTrainWorker" in open(log).read() or "ray" in open(log).read().lower()
    assert not re.search(r"\bINFO\b|\(RayTrainWorker|Traceback|GetTimeoutError|\[DeepSpeed\]|gRPC", err), err
    # Three questions, each answered four ways with ids; the base model knows none of these facts.
    questions = re.findall(r"^Q: .*\(expected: (.*); in (\S+)\)$", out, flags=re.M)
    assert len(questions) == 3
    assert len(re.findall(r"provenance prov-[0-9a-f]{32}  trace [0-9a-f]{32}", out)) == 12
    blocks = out.split("\nQ: ")[1:]
    grounded = 0
    for (expected, doc), block in zip(questions, blocks):
        base = re.search(r"^  base +\[tiny-llama\] (.*)$", block, flags=re.M).group(1)
        assert "know" in base.lower(), base  # declines instead of inventing
        rag = re.search(r"^  rag +\[tiny-llama\] (.*)$", block, flags=re.M).group(1)
        cited = re.findall(r"^  rag +  \[\d\] (\S+) ", block, flags=re.M)
        grounded += expected in rag and doc in cited
        assert re.search(r"^  adapter +\[support@v1\]", block, flags=re.M)
        assert re.search(r"^  hybrid +\[support@v1\]", block, flags=re.M)
    assert grounded >= 2, out  # retrieval answers with the document's fact and cites it
    leftovers = subprocess.run(["pgrep", "-f", f"milvus_lite.cmdline server --data-dir {home}"],
                               capture_output=True, text=True).stdout
    assert not leftovers.strip()
