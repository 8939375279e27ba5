"""`mrisr degrade` on files: the k-space degradation along canonical axes, geometry kept."""

from __future__ import annotations

from pathlib import Path

from mrisr_cli.degradation import DegradationConfig, degrade_volume, lowres_affine, lowres_volume
from mrisr_cli.volumes import canonical_reorientation, check_output_path, load_volume, save_volume


def degrade_file(
    hr_path: Path,
    lr_path: Path,
    config: DegradationConfig,
    *,
    lowres_path: Path | None = None,
    overwrite: bool = False,
) -> None:
    """Write the degraded volume on the input grid (and optionally the true low-res volume)."""
    check_output_path(lr_path, overwrite=overwrite)
    if lowres_path is not None:
        check_output_path(lowres_path, overwrite=overwrite)
    volume = load_volume(hr_path)
    reo = canonical_reorientation(volume.affine, volume.data.shape)
    canonical = reo.apply(volume.data)
    degraded = degrade_volume(canonical, config, affine=reo.canonical_affine)
    save_volume(lr_path, reo.undo(degraded), volume.affine, volume.header, overwrite=overwrite)
    if lowres_path is not None:
        low = lowres_volume(canonical, config)
        affine = lowres_affine(reo.canonical_affine, canonical.shape, config.factors())
        save_volume(lowres_path, low, affine, None, overwrite=overwrite)
