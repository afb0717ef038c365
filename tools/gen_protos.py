"""Generate the Python code of protos/ into libs/proto, or check that the committed code is fresh.

Generated code is committed (as temporalio/sdk-python does) so every package installs without
grpcio-tools; `--check` regenerates into a scratch folder and fails on any difference.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs" / "proto" / "src"
PACKAGE_DIR = Path("opsconductor") / "execution" / "v1"


def generate(out_root: Path) -> None:
    proto_files = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto")
    )
    well_known = str(files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *proto_files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make the generated folders regular packages below the `opsconductor` namespace.
    for pkg in (PACKAGE_DIR.parent, PACKAGE_DIR):
        (out_root / pkg / "__init__.py").touch()


def diff(expected: Path, actual: Path) -> list[str]:
    problems = []
    for path in sorted(expected.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(expected)
        other = actual / rel
        if not other.exists():
            problems.append(f"missing: {rel}")
        elif not filecmp.cmp(path, other, shallow=False):
            problems.append(f"stale: {rel}")
    for path in sorted((actual / PACKAGE_DIR).glob("*_pb2*")):
        if not (expected / path.relative_to(actual)).exists():
            problems.append(f"orphan: {path.relative_to(actual)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    if not args.check:
        target = OUT_ROOT / PACKAGE_DIR
        for old in target.glob("*_pb2*"):
            old.unlink()
        generate(OUT_ROOT)
        print(f"generated {target.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        problems = diff(Path(tmp), OUT_ROOT)
    if problems:
        print("generated code is stale; run `make protos`:", *problems, sep="\n  ")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
