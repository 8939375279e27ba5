"""What `upsample`'s handling of N4's bias field does to `mrisr evaluate`'s scores.

    python tools/bias_field_effect.py SCAN.nii.gz WORK --slab 4:120,46:114,12:128 --threads 2

Cuts a slab of SCAN (stored voxel indices; the whole scan without ``--slab``), degrades it with
`mrisr degrade`, super-resolves the degraded copy with the installed weights three ways (N4's
field put back, the default; ``--bias-corrected``; ``--no-n4``) and scores the three and the
degraded input against the slab with `mrisr evaluate --no-tissue`. The commands are the ones a
user types; their table is printed and WORK/report holds its CSV/JSON. The README's N4 table
came from this script on slabs of S08 and S02.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib

RUNS = {"sr_default": [], "sr_corrected": ["--bias-corrected"], "sr_non4": ["--no-n4"]}


def mrisr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mrisr_cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scan", type=Path)
    parser.add_argument("work", type=Path, help="new folder for the slab, outputs and report")
    parser.add_argument("--slab", help="a:b,c:d,e:f, stored voxel indices")
    parser.add_argument("--threads", default="2")
    args = parser.parse_args()

    (args.work / "hr").mkdir(parents=True)
    (args.work / "lr").mkdir()
    image = nib.load(str(args.scan))
    if args.slab:
        bounds = [tuple(int(v) for v in part.split(":")) for part in args.slab.split(",")]
        image = image.slicer[tuple(slice(a, b) for a, b in bounds)]
    hr, lr = args.work / "hr" / "scan.nii.gz", args.work / "lr" / "scan.nii.gz"
    nib.save(image, str(hr))
    mrisr("degrade", str(hr), str(lr))
    for name, options in RUNS.items():
        mrisr(
            "upsample",
            f"{args.work / 'lr'}/",
            f"{args.work / name}/",
            "--threads",
            args.threads,
            *options,
        )
    predictions = [arg for name in [*RUNS, "lr"] for arg in ("--pred", str(args.work / name))]
    mrisr(
        "evaluate",
        "--ref",
        str(args.work / "hr"),
        *predictions,
        "--no-tissue",
        "--threads",
        args.threads,
        "--out",
        str(args.work / "report"),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
