"""`tunefetch demo`, the main job, end to end in its own home."""

from __future__ import annotations

import re
import subprocess

from conftest import CLI, free_port


def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path_factory):
    # Own home and port; a second run in the same home must work too.
    cli = CLI(tmp_path_factory.mktemp("demo-home"))
    port = str(free_port())
    out = cli("demo", "--port", port).stdout
    assert "kestrel@v1" in out and "registered support@v1" in out
    assert re.search(r"\[support@v1\] Kestrel Support:", out)
    assert re.search(r"\[\d+\] returns-policy .*kestrel@v1", out)
    assert len(re.findall(r"provenance prov-[0-9a-f]{32}  trace [0-9a-f]{32}", out)) == 6
    again = cli("demo", "--port", port).stdout
    assert "kestrel@v2" in again and "registered support@v2" in again
    leftovers = subprocess.run(["pgrep", "-f", f"milvus_lite.cmdline server --data-dir {cli.home}"],
                               capture_output=True, text=True).stdout
    assert not leftovers.strip()
