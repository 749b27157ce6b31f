"""Regenerate `podresources_pb2.py` and `podresources_pb2_grpc.py` from `podresources.proto` (grpcio-tools).

Run from anywhere: `python agents/kubelet/generate.py`. The modules are generated as
`gpufleet.agents.kubelet.*`, so the gRPC module imports the message module by its installed name.
The output is committed; installs never run protoc.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = ("gpufleet", "agents", "kubelet")


def main() -> int:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        target = root.joinpath(*PACKAGE)
        target.mkdir(parents=True)
        shutil.copy(HERE / "podresources.proto", target / "podresources.proto")
        rel = "/".join((*PACKAGE, "podresources.proto"))
        code = protoc.main(["protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}",
                            f"--grpc_python_out={root}", str(root / rel)])
        if code != 0:
            return int(code)
        for name in ("podresources_pb2.py", "podresources_pb2.pyi", "podresources_pb2_grpc.py"):
            shutil.copy(target / name, HERE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
