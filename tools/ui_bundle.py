"""Stamp the committed UI bundle with the inputs it was built from, or check it is fresh.

``make ui`` (Node.js: buf + protoc-gen-es + esbuild) rebuilds
``services/progress/src/opsconductor/progress/ui/grpc-client.js`` and then runs this with
``--stamp``. ``--check`` (part of ``make test``, no Node.js needed) fails when a proto or the
client's sources changed since, or when the bundle was edited by hand: like ``protos-check``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_SRC = ROOT / "services" / "progress" / "ui-src"
BUNDLE = (
    ROOT / "services" / "progress" / "src" / "opsconductor" / "progress" / "ui" / "grpc-client.js"
)
STAMP = BUNDLE.with_name("grpc-client.stamp.json")


#: The protos the client imports (src/client.ts); the others do not reach the bundle.
PROTOS = ("types", "execution_service", "approval_service", "progress_service")


def _inputs() -> list[Path]:
    folder = ROOT / "protos" / "opsconductor" / "execution" / "v1"
    protos = [folder / f"{name}.proto" for name in PROTOS]
    sources = sorted((UI_SRC / "src").glob("*.ts"))
    return [
        *protos,
        *sources,
        *(UI_SRC / n for n in ("package.json", "package-lock.json", "buf.gen.yaml")),
    ]


def _digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def _current() -> dict[str, str]:
    return {"inputs": _digest(_inputs()), "bundle": _digest([BUNDLE])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stamp", action="store_true", help="record the inputs of a fresh build")
    mode.add_argument("--check", action="store_true", help="fail if the bundle is stale")
    args = parser.parse_args()
    if args.stamp:
        STAMP.write_text(json.dumps(_current(), indent=2) + "\n")
        print(f"stamped {STAMP.relative_to(ROOT)}")
        return 0
    if not STAMP.exists() or not BUNDLE.exists():
        print("the UI bundle or its stamp is missing; run `make ui`")
        return 1
    recorded = json.loads(STAMP.read_text())
    current = _current()
    if recorded.get("bundle") != current["bundle"]:
        print("ui/grpc-client.js differs from the build that was stamped; run `make ui`")
        return 1
    if recorded.get("inputs") != current["inputs"]:
        print("the UI bundle is stale (protos/ or ui-src/ changed); run `make ui`")
        return 1
    print("UI bundle is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
