"""Pack a prepared dataset small enough to send to a GPU node, or unpack it there.

    python tools/pack_dataset.py pack data/prepared carry/pack      # ~2 MB per subject
    python tools/pack_dataset.py unpack carry/pack /tmp/data --jobs 16

See :mod:`mrisr_cli.compact` for what is kept and what is remade.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrisr_cli.compact import pack_dataset, unpack_dataset
from mrisr_cli.errors import MrisrError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    pack = sub.add_parser("pack", help="prepared data folder -> pack folder")
    pack.add_argument("data", type=Path)
    pack.add_argument("out", type=Path)
    pack.add_argument("--splits", default="train,val,eval,test", help="splits to keep")
    unpack = sub.add_parser("unpack", help="pack folder -> data folder for `mrisr train`")
    unpack.add_argument("pack", type=Path)
    unpack.add_argument("out", type=Path)
    unpack.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    try:
        if args.action == "pack":
            result = pack_dataset(args.data, args.out, splits=tuple(args.splits.split(",")))
            size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
            print(f"packed {len(result['subjects'])} subjects into {args.out} ({size:.1f} MB)")
        else:
            manifest = unpack_dataset(args.pack, args.out, jobs=args.jobs)
            print(f"unpacked {len(manifest['subjects'])} subjects: {manifest['counts']}")
    except MrisrError as exc:
        print(f"pack_dataset: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
