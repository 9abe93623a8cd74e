"""``python -m crds`` writes crds/*.yaml from the models; ``--check`` exits 1 on drift."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crds.generate import CRD_DIR, GenerationError, check, write_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crds", description="Generate the MatrixInfer CRDs from the models."
    )
    parser.add_argument(
        "--check", action="store_true", help="report drift instead of writing (exit 1 on drift)"
    )
    parser.add_argument("--dir", type=Path, default=CRD_DIR, help="output folder (default: crds/)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.dir)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                return 1
            print(f"CRDs in {args.dir} match the models")
            return 0
        for path in write_all(args.dir):
            print(f"wrote {path}")
        return 0
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
