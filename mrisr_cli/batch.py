"""Several inputs, several alphas, one loaded model: planning and running upsample jobs.

Outputs are all decided (and checked) before any network runs, so a typo in the last file name
does not surface after an hour of work; a bad input is reported and the others go on.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mrisr_cli.console import progress_bar
from mrisr_cli.errors import InputError, MrisrError, OutputError
from mrisr_cli.inference import resolve_device
from mrisr_cli.pipeline import (
    GeneratorFiles,
    UpsampleOptions,
    output_settings,
    prepare_input,
    sidecar_path,
    upsample_prepared,
)
from mrisr_cli.volumes import (
    BROKEN_LINK,
    NIFTI_SUFFIXES,
    check_output_path,
    image_files,
    is_volume_path,
    os_reason,
    same_file,
    strip_suffix,
)
from mrisr_cli.weights import sha256_of


@dataclass(frozen=True)
class UpsampleJob:
    """One input, one alpha, one output path."""

    input: Path
    output: Path
    alpha: float


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the images directly inside them
    (:func:`~mrisr_cli.volumes.image_files`: sorted, hidden files left out). A file named twice
    (``in/*.nii.gz in/``) is kept once."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            try:
                found = image_files(path)
            except OSError as exc:
                raise InputError(f"{path}: folder cannot be read ({os_reason(exc)})") from exc
            if not found:
                raise InputError(
                    f"{path}: folder holds no .nii/.nii.gz/.mgz images (subfolders are not "
                    "searched: name them, e.g. bids/sub-*/anat/)"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif path.is_symlink():
            raise InputError(f"{path}: {BROKEN_LINK}")
        else:
            raise InputError(f"{path}: no such file or folder")
    unique: dict[tuple[str, str], Path] = {}
    for path in files:  # one file named twice, also through a link of the same name
        unique.setdefault((os.path.realpath(path), path.name), path)
    return list(unique.values())


def _alpha_tag(alpha: float) -> str:
    return f"_alpha-{alpha:g}"


def plan_jobs(
    inputs: list[Path],
    output: Path,
    alphas: list[float],
    *,
    overwrite: bool,
    output_is_folder: bool = False,
    skip_existing: bool = False,
) -> Plan:
    """Map inputs x alphas to output paths: a file for one input, else a folder (also when
    ``output_is_folder``, e.g. it was typed with a trailing slash).

    Every output and its JSON sidecar is checked before anything is written; a missing output
    folder is made only once the whole plan holds (and removed by :meth:`Plan.release` should
    the run write nothing into it). With ``skip_existing`` outputs that exist are left to
    :func:`split_finished`.
    """
    files = expand_inputs(inputs)
    alphas = list(dict.fromkeys(alphas))  # "0.5,0.50" asks for one output
    into_folder = (
        output_is_folder or len(files) > 1 or any(p.is_dir() for p in inputs) or output.is_dir()
    )
    jobs: list[UpsampleJob] = []
    if into_folder:
        if output.is_dir() and any(
            p.samefile(output) for p in [*inputs, *(f.parent for f in files)] if p.is_dir()
        ):
            raise OutputError(
                f"{output}: is an input folder; its outputs would be read as inputs by the "
                "next run: choose another output folder"
            )
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
    made = into_folder and not output.is_dir() and _make_folder(output)
    folder = OutputFolder(output if into_folder else output.parent, made=made)
    try:
        for target in targets:
            if not (skip_existing and target.exists()):
                check_output_path(target, overwrite=overwrite)
    except BaseException:
        folder.release()
        raise
    return Plan(jobs, folder)


def _make_folder(folder: Path) -> bool:
    """Make a missing output folder; False where another process made it first (two tasks of a
    job array starting together). Anything else in the way is one OutputError line."""
    if folder.is_symlink():  # and not a folder: a link to nothing
        raise OutputError(
            f"{folder}: output folder is a link to a missing folder; make the folder it points "
            "to, or choose another output folder"
        )
    check_output_path(folder, overwrite=True)  # its parent; whether it exists is mkdir's to say
    try:
        folder.mkdir()
    except FileExistsError:
        if not folder.is_dir():
            raise OutputError(f"{folder}: not a folder (made while this run started)") from None
        return False
    except OSError as exc:
        raise OutputError(f"{folder}: output folder cannot be made ({os_reason(exc)})") from exc
    return True


class OutputFolder:
    """The folder a run writes into, held with a shared lock until :meth:`release`, which removes
    it again where this run made it and left it empty, unless another run holds it: a job of the
    same array that started meanwhile may be computing its first output for it. Where the file
    system has no such locks (some network file systems), a folder made here stays."""

    def __init__(self, path: Path, *, made: bool) -> None:
        self.path, self.made = path, made
        self._fd: int | None = None
        with suppress(OSError):
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def release(self) -> None:
        """Let the folder go; never in the way of an error being reported."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.made:
                with suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other run holds it
                    self.path.rmdir()  # only if empty
        finally:
            os.close(fd)


@dataclass
class Plan:
    """The jobs :func:`plan_jobs` decided on, and their output folder, held until
    :meth:`release` (to be called however the run ends)."""

    jobs: list[UpsampleJob]
    folder: OutputFolder

    def release(self) -> None:
        self.folder.release()


@dataclass
class Resume:
    """What ``--skip-existing`` makes of a plan: jobs to run, jobs an earlier run finished, and
    jobs whose existing output it cannot take over (each with its one-line reason)."""

    to_run: list[UpsampleJob]
    finished: list[UpsampleJob]
    refused: list[tuple[UpsampleJob, str]]
    #: the inputs' sha256 the checks computed, so that running the rest does not hash them again
    input_sha256: dict[Path, str] = field(default_factory=dict)


def split_finished(
    jobs: list[UpsampleJob],
    files: GeneratorFiles,
    options: UpsampleOptions,
    *,
    input_sha256: dict[Path, str] | None = None,
) -> Resume:
    """Sort the jobs for ``mrisr upsample --skip-existing``, so that a resubmitted batch job
    redoes only what is missing.

    An output is finished when its image exists next to a sidecar that records the same input
    file (its sha256: a moved folder is fine, an input changed since is not), alpha, weights and
    voxel-changing settings (:func:`~mrisr_cli.pipeline.output_settings`), and the image's own
    sha256 (a truncated or edited image is not finished). Any other existing
    output is refused, with the reason: skipping it would pass off another result as this one's,
    and replacing it is for ``--overwrite``. A sidecar of this output whose image is gone
    (deleted to redo it) is removed, and the job runs. ``input_sha256``: hashes known already,
    which the result's ``input_sha256`` is (and extends).
    """
    weights = _weights_of(files.sources())
    settings = output_settings(options, options.uses_n4(files.degradation))
    resume = Resume([], [], [], {} if input_sha256 is None else input_sha256)
    hashes = resume.input_sha256
    stale: list[tuple[Path, Path, os.stat_result]] = []  # sidecar, its image, as it was read
    for job in jobs:
        image, sidecar = job.output, sidecar_path(job.output)
        try:
            seen = sidecar.stat()  # before it is read: what a stale sidecar must still be
        except OSError:
            seen = None  # there is none
        both = f"{image.name} and {sidecar.name}" if seen is not None else image.name
        redo = f"delete {both} to make it again, or choose another output"
        try:
            record = _read_sidecar(sidecar) if seen is not None else None
        except OutputError as exc:  # not ours to delete: the user's own file, perhaps
            resume.refused.append((job, str(exc)))
            continue
        recorded_output = Path(str((record or {}).get("output", image))).name
        if record is not None and recorded_output != image.name:
            resume.refused.append(
                (job, f"{sidecar}: is the sidecar of {recorded_output}; choose another output")
            )
            continue
        if not image.exists():
            if record is not None and seen is not None:
                stale.append((sidecar, image, seen))
            resume.to_run.append(job)
            continue
        if record is None or image.is_dir():
            resume.refused.append(
                (job, f"{image}: exists, but no sidecar {sidecar.name} says what made it; {redo}")
            )
            continue
        if job.input not in hashes:
            try:
                hashes[job.input] = sha256_of(job.input)
            except OSError as exc:
                resume.refused.append((job, f"{job.input}: cannot be read ({os_reason(exc)})"))
                continue
        recorded_sha = record.get("input_sha256")
        same_input = (
            recorded_sha == hashes[job.input]
            if isinstance(recorded_sha, str)
            else _same_file(record.get("input"), job.input)  # a sidecar of an earlier version
        )
        differences = [
            what
            for what, same in (
                (f"input {record.get('input')}", same_input),
                (f"alpha {record.get('alpha')}", record.get("alpha") == job.alpha),
                ("other weights", _weights_of(record.get("weights")) == weights),
                *(
                    (
                        f"{key} {record[key]!r}" if key in record else f"{key} {UNRECORDED[key]}",
                        record.get(key, BEFORE_RECORDED.get(key)) == value,
                    )
                    for key, value in settings.items()
                ),
            )
            if not same
        ]
        if not same_input and _same_file(record.get("input"), job.input):
            differences[0] = "its input has changed since: another sha256"
        if differences:
            resume.refused.append(
                (job, f"{image}: made by another run ({', '.join(differences)}); {redo}")
            )
            continue
        recorded_output_sha = record.get("output_sha256")  # older sidecars have none
        if isinstance(recorded_output_sha, str):
            try:
                intact = sha256_of(image) == recorded_output_sha
            except OSError as exc:
                resume.refused.append((job, f"{image}: cannot be read ({os_reason(exc)})"))
                continue
            if not intact:
                resume.refused.append(
                    (
                        job,
                        f"{image}: is not the image its sidecar records (another sha256: "
                        f"changed or damaged since it was written); {redo}",
                    )
                )
                continue
        resume.finished.append(job)
    for sidecar, image, seen in stale:  # after the checks, so that a crash in them leaves every
        # file as it was; and only as it was read, still without image: another job (a task
        # resubmitted while it still ran) places its sidecar first and its image just after
        with suppress(OSError):
            now = sidecar.stat()
            if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns) and not (
                image.exists()
            ):
                sidecar.unlink()
    return resume


#: what a setting is taken to have been in outputs of versions that did not record it yet:
#: with keep_background (sidecars without it are refused for lacking it), tiles of only air kept
#: the input's values; with --no-keep-background they did in early versions and not in later
#: ones, which the sidecar cannot tell apart, so such an output is refused (UNRECORDED says why)
BEFORE_RECORDED: dict[str, object] = {"air_tiles": "input"}
UNRECORDED = {
    "air_tiles": "not recorded (an earlier version's --no-keep-background output may have kept "
    "the input in tiles of only air)"
}


def _weights_of(sources: object) -> list[tuple[str, str]]:
    """(role, sha256) of each weights file a sidecar records (anything else: none)."""
    if not isinstance(sources, list):
        return []
    return sorted(
        (str(s.get("role")), str(s.get("sha256"))) for s in sources if isinstance(s, dict)
    )


def _read_sidecar(path: Path) -> dict[str, Any]:
    """An mrisr sidecar's record, or an error naming the file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(
            f"{path}: not a sidecar mrisr can read ({exc}); choose another output name"
        ) from exc
    if not isinstance(record, dict) or "mrisr_version" not in record:
        raise OutputError(f"{path}: exists and is not an mrisr sidecar; choose another output name")
    return record


def _same_file(recorded: object, path: Path) -> bool:
    """Whether a sidecar's absolute input path (any JSON value) names ``path``."""
    return isinstance(recorded, str) and same_file(recorded, path)


def run_upsample_jobs(
    jobs: list[UpsampleJob],
    files: GeneratorFiles,
    options: UpsampleOptions,
    *,
    console: Console,
    warn: Callable[[str], None],
    error: Callable[[str], None],
    input_sha256: dict[Path, str] | None = None,
    skipped: Callable[[str], None] | None = None,
) -> int:
    """Run every job; return how many failed.

    One generator per alpha, all made first: a missing GAN file or two files that cannot be
    blended surface before any input is read. Each input is read and N4-corrected once for all
    its alphas (a whole head's N4 takes minutes on a few cores). Where the console is not a
    terminal (a batch job's log) there is no bar, so each job's start gets a line; each "wrote"
    line names the device. ``input_sha256``: hashes already computed (by :func:`split_finished`).

    ``skipped`` (``--skip-existing``): each input's jobs are sorted by :func:`split_finished`
    again just before they run, and an output another run (the same batch submitted twice)
    finished meanwhile, before or while this one computed it, is reported through it, not run or
    counted as failed.
    """
    hashes = dict(input_sha256 or {})
    # no device given: as the CLI (the generators are made here, on it)
    device = resolve_device(options.inference.device or "auto")
    generators = {
        alpha: files.generator(alpha, device) for alpha in dict.fromkeys(j.alpha for j in jobs)
    }
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        threads = torch.get_num_threads()
        where = f"{device}, {threads} thread{'s' if threads != 1 else ''}"
    reading = "reading, N4" if options.uses_n4(files.degradation) else "reading"
    by_input: dict[Path, list[UpsampleJob]] = {}
    for job in jobs:
        by_input.setdefault(job.input, []).append(job)
    failures = started = 0
    with progress_bar(console) as progress:
        subjects = progress.add_task("subjects", total=len(jobs))
        for path, all_its_jobs in by_input.items():
            its_jobs = all_its_jobs
            if skipped is not None:
                resume = split_finished(all_its_jobs, files, options, input_sha256=hashes)
                for job in resume.finished:
                    skipped(f"{job.output}: finished meanwhile by another run of {job.input}")
                for _job, reason in resume.refused:
                    error(reason)
                failures += len(resume.refused)
                its_jobs = resume.to_run
                progress.advance(subjects, len(all_its_jobs) - len(its_jobs))
                started += len(all_its_jobs) - len(its_jobs)
                if not its_jobs:
                    continue
            task = progress.add_task(f"{path.name} ({reading})", total=None)
            try:
                generator = generators[its_jobs[0].alpha]
                prepared = prepare_input(
                    path, generator.weights.degradation, options, sha256=hashes.get(path)
                )
                hashes.setdefault(path, prepared.sha256)
            except MrisrError as exc:
                failures += len(its_jobs)
                error(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
                progress.remove_task(task)
                progress.advance(subjects, len(its_jobs))
                started += len(its_jobs)
                continue
            shown: set[str] = set()
            for job in its_jobs:
                progress.update(task, description=f"{path.name} (alpha {job.alpha:g})")
                started += 1
                if len(jobs) > 1 and not console.is_terminal:
                    line = f"[{started}/{len(jobs)}] {job.input} (alpha {job.alpha:g})"
                    console.print(line, markup=False)

                def advance(done: int, total: int, task: int = task) -> None:
                    progress.update(task, completed=done, total=total)

                try:
                    result = upsample_prepared(
                        prepared, job.output, generators[job.alpha], options, advance
                    )
                except MrisrError as exc:
                    if skipped is not None and _finished_meanwhile(job, files, options, hashes):
                        skipped(f"{job.output}: finished meanwhile by another run of {job.input}")
                    else:
                        failures += 1
                        error(str(exc) if str(job.input) in str(exc) else f"{job.input}: {exc}")
                else:
                    for message in result.warnings:  # an input's own warnings: once, not per alpha
                        if message not in shown:
                            shown.add(message)
                            warn(f"{job.input}: {message}")
                    seconds = result.seconds["total"]
                    line = f"wrote {os.fspath(job.output)} ({seconds:.1f} s, {where})"
                    progress.console.print(line, markup=False)
                progress.advance(subjects)
            progress.remove_task(task)
    return failures


def _finished_meanwhile(
    job: UpsampleJob, files: GeneratorFiles, options: UpsampleOptions, hashes: dict[Path, str]
) -> bool:
    """Whether another run put ``job``'s output in place, with the same input, alpha, weights and
    settings (as :func:`split_finished` judges), while this one made it: why its write failed.
    Only with the image there: a sidecar still without it may be the other run's, being put in
    place, which :func:`split_finished` would remove as stale."""
    if not job.output.exists():
        return False
    return split_finished([job], files, options, input_sha256=hashes).finished == [job]
