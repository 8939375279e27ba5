"""Several inputs, several alphas, one loaded model: planning and running upsample jobs.

Outputs are all decided (and checked) before any network runs, so a typo in the last file name
does not surface after an hour of work; a bad input is reported and the others go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mrisr_cli.console import progress_bar
from mrisr_cli.errors import InputError, MrisrError, OutputError
from mrisr_cli.pipeline import GeneratorFiles, UpsampleOptions, sidecar_path, upsample_file
from mrisr_cli.volumes import (
    NIFTI_SUFFIXES,
    check_output_path,
    image_files,
    is_volume_path,
    strip_suffix,
)


@dataclass(frozen=True)
class UpsampleJob:
    """One input, one alpha, one output path."""

    input: Path
    output: Path
    alpha: float


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the images directly inside them
    (:func:`~mrisr_cli.volumes.image_files`: sorted, hidden files left out)."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise InputError(
                    f"{path}: folder holds no .nii/.nii.gz/.mgz images (subfolders are not "
                    "searched: name them, e.g. bids/sub-*/anat/)"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def _alpha_tag(alpha: float) -> str:
    return f"_alpha-{alpha:g}"


def plan_jobs(
    inputs: list[Path],
    output: Path,
    alphas: list[float],
    *,
    overwrite: bool,
    output_is_folder: bool = False,
) -> list[UpsampleJob]:
    """Map inputs x alphas to output paths: a file for one input, else a folder (also when
    ``output_is_folder``, e.g. it was typed with a trailing slash).

    Every output and its JSON sidecar is checked before anything is written; a missing output
    folder is made only once the whole plan holds.
    """
    files = expand_inputs(inputs)
    alphas = list(dict.fromkeys(alphas))  # "0.5,0.50" asks for one output
    into_folder = (
        output_is_folder or len(files) > 1 or any(p.is_dir() for p in inputs) or output.is_dir()
    )
    jobs: list[UpsampleJob] = []
    if into_folder:
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output}: several inputs need an output folder, this is a file")
        if not output.exists() and not output_is_folder and is_volume_path(output):
            raise OutputError(
                f"{output}: several inputs need an output folder, and this names an image file "
                "(for a folder of that name, end it with /)"
            )
        for path in files:
            for alpha in alphas:
                tag = _alpha_tag(alpha) if len(alphas) > 1 else ""
                jobs.append(
                    UpsampleJob(path, output / f"{strip_suffix(path.name)}{tag}.nii.gz", alpha)
                )
    else:
        if not is_volume_path(output):
            raise OutputError(
                f"{output}: output file must end in {', '.join(NIFTI_SUFFIXES)} "
                "(a folder: end it with /)"
            )
        for alpha in alphas:
            target = output
            if len(alphas) > 1:
                stem = strip_suffix(output.name)
                suffix = output.name[len(stem) :]  # as typed: .nii.gz, .NII, .mgz
                target = output.with_name(f"{stem}{_alpha_tag(alpha)}{suffix}")
            jobs.append(UpsampleJob(files[0], target, alpha))
    writers: dict[Path, UpsampleJob] = {}
    for job in jobs:
        first = writers.setdefault(job.output, job)
        if first.input != job.input:
            raise OutputError(
                f"{first.input} and {job.input} would both write {job.output}; rename one of them"
            )
        if first.alpha != job.alpha:  # names keep 6 significant digits of alpha
            raise OutputError(
                f"--alpha {first.alpha!r} and {job.alpha!r} would both write {job.output}; "
                "give alphas that differ in their first 6 digits"
            )
    resolved_inputs = {p.resolve() for p in files}
    targets = [job.output for job in jobs] + [sidecar_path(job.output) for job in jobs]
    for target in targets:
        if target.resolve() in resolved_inputs:
            raise OutputError(f"{target}: output would overwrite an input")
    if into_folder and not output.exists():
        # nothing can exist in a folder still to be made: check only that it can be made
        check_output_path(output, overwrite=False)
        output.mkdir()
    for target in targets:
        check_output_path(target, overwrite=overwrite)
    return jobs


def run_upsample_jobs(
    jobs: list[UpsampleJob],
    files: GeneratorFiles,
    options: UpsampleOptions,
    *,
    console: Console,
    warn: Callable[[str], None],
    error: Callable[[str], None],
) -> int:
    """Run every job (one generator per alpha); return how many failed."""
    failures = 0
    with progress_bar(console) as progress:
        subjects = progress.add_task("subjects", total=len(jobs))
        for alpha in dict.fromkeys(job.alpha for job in jobs):
            generator = files.generator(alpha, options.inference.device)
            for job in (j for j in jobs if j.alpha == alpha):
                task = progress.add_task(f"{job.input.name} (alpha {alpha:g})", total=None)

                def advance(done: int, total: int, task: int = task) -> None:
                    progress.update(task, completed=done, total=total)

                try:
                    result = upsample_file(job.input, job.output, generator, options, advance)
                except MrisrError as exc:
                    failures += 1
                    error(str(exc) if str(job.input) in str(exc) else f"{job.input}: {exc}")
                else:
                    for message in result.warnings:
                        warn(f"{job.input}: {message}")
                    progress.console.print(
                        f"wrote {os.fspath(job.output)} ({result.seconds['total']:.1f} s)",
                        markup=False,
                    )
                progress.remove_task(task)
                progress.advance(subjects)
    return failures
