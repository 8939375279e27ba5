"""What `upsample`'s flat-background rule changes in `mrisr evaluate`'s image metrics.

    python tools/keep_background_effect.py --hr work/hr --lr work/lr --pred work/rrdg_psnr

For outputs written with ``--no-keep-background`` (or before the rule existed), applies the rule
afterwards (voxels of the LR input's flat background take the input's value, as ``upsample``
does by default) and prints PSNR and SSIM over the whole volume and inside the reference's mask,
before and after, per subject, plus how far the reference itself is from the kept value there.
Files are matched by name; all three folders hold volumes on the same grid (as `mrisr prepare`
and `tools/train_release.py` write them). Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from mrisr_cli.evaluation import reference_mask
from mrisr_cli.intensity import flat_background
from mrisr_cli.metrics import image_metrics
from mrisr_cli.volumes import image_files, load_volume


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hr", type=Path, required=True, help="references")
    parser.add_argument("--lr", type=Path, required=True, help="the inputs given to upsample")
    parser.add_argument("--pred", type=Path, required=True, help="outputs without the rule")
    args = parser.parse_args()
    print("subject | kept | max |HR - kept value| | PSNR | SSIM | PSNR mask | SSIM mask")
    for pred_path in image_files(args.pred):
        ref = load_volume(args.hr / pred_path.name).data
        low = load_volume(args.lr / pred_path.name).data
        pred = load_volume(pred_path).data
        background = flat_background(low)
        kept = pred.copy()
        kept[background] = low.min()
        mask = reference_mask(ref)
        before, after = image_metrics(ref, pred, mask), image_metrics(ref, kept, mask)
        gap = float(np.abs(ref[background] - low.min()).max()) if background.any() else 0.0
        print(
            f"{pred_path.name} | {background.mean():.1%} | {gap:.3g} | "
            f"{before.psnr:.2f} -> {after.psnr:.2f} | {before.ssim:.3f} -> {after.ssim:.3f} | "
            f"{before.psnr_mask:.2f} -> {after.psnr_mask:.2f} | "
            f"{before.ssim_mask:.3f} -> {after.ssim_mask:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
