"""The container recipes keep their promises, checked without a container engine.

No Docker daemon or Apptainer runs here, so these tests read the recipes instead: the Dockerfile
through ``dockerfile_parse`` (skipped cleanly where that package is absent), Singularity.def with a
small section parser. Where a recipe holds shell code, the code itself is run: the Dockerfile's
weights check, Singularity.def's %environment, the SLURM example scripts (with stand-ins for
``singularity``, ``srun`` and ``scontrol``), and, in the slow test, the Dockerfile's builder steps
replayed in a fresh venv followed by the image's smoke test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SINGULARITY_DEF = REPO / "Singularity.def"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

OCI_LABELS = ("version", "source", "licenses", "title", "description")
CACHE_VARS = ("MPLCONFIGDIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


# --------------------------------------------------------------------------------------------------
# Dockerfile, read with dockerfile_parse
# --------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [value for instr, value in self.instructions if instr == instruction]


@dataclass
class Dockerfile:
    stages: list[Stage]
    labels: dict[str, str]
    envs: dict[str, str]

    @property
    def builder(self) -> Stage:
        return self.stages[0]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    parse = pytest.importorskip("dockerfile_parse")
    # fileobj, not path: the parser must never write back to the repository's file.
    parser = parse.DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()), env_replace=False)
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((instruction, value))
    return Dockerfile(stages=stages, labels=parser.labels, envs=parser.envs)


def _env_pairs(value: str) -> dict[str, str]:
    """The variables of one ``ENV A=1 B="x y"`` instruction."""
    pairs = {}
    for token in shlex.split(value):
        assert "=" in token, f"use the ENV key=value form, not {value!r}"
        key, _, val = token.partition("=")
        pairs[key] = val
    return pairs


def _copy_args(value: str) -> tuple[list[str], list[str], str]:
    """(flags, sources, destination) of one COPY instruction."""
    words = shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def test_is_multi_stage_and_runtime_takes_the_builders_venv(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    builder = dockerfile.builder
    assert builder.name, "the builder stage needs a name for COPY --from"
    copies_from_builder = [
        v for v in dockerfile.runtime.values("COPY") if f"--from={builder.name}" in v
    ]
    assert copies_from_builder, "the runtime stage must take its venv from the builder"
    assert not any("pip install" in v for v in dockerfile.runtime.values("RUN")), (
        "installs belong in the builder; the runtime stage only copies the result"
    )


def test_base_images_are_pinned(dockerfile: Dockerfile) -> None:
    stage_names = {s.name for s in dockerfile.stages if s.name}
    for stage in dockerfile.stages:
        image = stage.image
        assert image not in stage_names
        assert "$" not in image, f"FROM {image}: write the tag out, the tests read it"
        last = image.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"FROM {image} has no tag"
        tag = last.split("@")[0].partition(":")[2]
        assert tag and tag != "latest", f"FROM {image}: pin a version, never latest"
    # The venv's interpreter is a link into the builder's base: both stages need the same one.
    assert len({s.image for s in dockerfile.stages}) == 1


def test_torch_is_pinned_to_a_version_pyproject_allows(dockerfile: Dockerfile) -> None:
    from packaging.requirements import Requirement

    pins = [
        m.group(1)
        for run in dockerfile.builder.values("RUN")
        for m in re.finditer(r"\btorch==([0-9][0-9A-Za-z.+]*)", run)
    ]
    assert len(pins) == 1, f"expected one pinned torch install in the builder, got {pins}"
    torch_req = next(
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")
    )
    assert torch_req.specifier.contains(pins[0]), f"torch=={pins[0]} vs pyproject {torch_req}"


def test_apt_installs_are_lean_and_leave_no_lists(dockerfile: Dockerfile) -> None:
    compilers = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|[\w.+-]+-dev)\b")
    for stage in dockerfile.stages:
        for run in stage.values("RUN"):
            if "apt-get install" not in run:
                continue
            assert "--no-install-recommends" in run, run
            assert "rm -rf /var/lib/apt/lists/*" in run, run
            if stage is dockerfile.runtime:
                assert not compilers.search(run), f"no compilers in the runtime stage: {run}"


def test_pip_keeps_no_cache(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        env: dict[str, str] = {}
        for instruction, value in stage.instructions:
            if instruction == "ENV":
                env.update(_env_pairs(value))
            if instruction == "RUN" and "pip install" in value:
                no_cache = "--no-cache-dir" in value or env.get("PIP_NO_CACHE_DIR") in {"1", "on"}
                assert no_cache, f"pip must not keep its cache in a layer: {value}"


def test_runs_as_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    users = dockerfile.runtime.values("USER")
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1]
    # Numeric, so that a runtime (e.g. Kubernetes' runAsNonRoot) can tell it is not root.
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: use a numeric uid[:gid]"
    assert int(user.split(":")[0]) != 0


def test_entrypoint_is_mrisr_and_cmd_is_help(dockerfile: Dockerfile) -> None:
    assert json.loads(dockerfile.runtime.values("ENTRYPOINT")[-1]) == ["mrisr"]
    assert json.loads(dockerfile.runtime.values("CMD")[-1]) == ["--help"]


def test_oci_labels(dockerfile: Dockerfile) -> None:
    for key in OCI_LABELS:
        assert dockerfile.labels.get(f"org.opencontainers.image.{key}"), key
    assert dockerfile.labels["org.opencontainers.image.version"] == VERSION
    licence = dockerfile.labels["org.opencontainers.image.licenses"]
    assert licence == PYPROJECT["project"]["license"]  # an SPDX expression in both
    assert (REPO / "LICENSE").read_text().startswith(f"{licence} License")


def test_runtime_env_is_safe_for_read_only_images(dockerfile: Dockerfile) -> None:
    env = dockerfile.envs
    assert env.get("PYTHONNOUSERSITE") == "1"
    for name in CACHE_VARS:
        assert env.get(name, "").startswith("/tmp/"), f"{name} must point under /tmp"
    # A thread count baked into the image would override --threads and SLURM_CPUS_PER_TASK.
    assert not set(THREAD_VARS) & set(env)
    assert env.get("MRISR_WEIGHTS") == "/opt/mrisr/weights"


def test_weights_are_copied_then_verified(dockerfile: Dockerfile) -> None:
    seen_copy = False
    verified = False
    for instruction, value in dockerfile.runtime.instructions:
        if instruction == "COPY":
            flags, sources, dest = _copy_args(value)
            if not flags and any(s.rstrip("/") == "weights" for s in sources):
                seen_copy = True
                assert dest.rstrip("/") == "/opt/mrisr/weights"
        if instruction == "RUN" and seen_copy and "sha256sum" in value:
            verified = bool(re.search(r"sha256sum\s+(-c|--check)\b", value))
    assert seen_copy, "weights/ must be copied into the image"
    assert (REPO / "weights").is_dir(), "COPY weights/ needs the folder (commit its README.md)"
    assert verified, "the copied weights must be checked with sha256sum -c"


def test_build_time_smoke_test_runs_as_the_user(dockerfile: Dockerfile) -> None:
    after_user = False
    smoke = []
    for instruction, value in dockerfile.runtime.instructions:
        after_user = after_user or instruction == "USER"
        if instruction == "RUN" and after_user and "mrisr" in value:
            smoke.append(value)
    assert any(
        "mrisr --version" in run and "mrisr selftest --device cpu" in run for run in smoke
    ), "the image must run `mrisr --version` and `mrisr selftest --device cpu` when built"


def _weights_check_run(dockerfile: Dockerfile) -> str:
    runs = [v for v in dockerfile.runtime.values("RUN") if "sha256sum" in v]
    assert len(runs) == 1
    return runs[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("case", "passes"),
    [
        ("repository", True),
        ("empty_sums_no_weights", True),
        ("no_sums_no_weights", True),
        ("listed_and_matching", True),
        ("binary_mode_line", True),
        ("corrupted", False),
        ("weights_without_sum", False),
        ("listed_but_missing", False),
    ],
)
def test_weights_check_step_behaves(
    dockerfile: Dockerfile, tmp_path: Path, case: str, passes: bool
) -> None:
    """The Dockerfile's own RUN line, run on copies of weights/ in each state it can be in."""
    if not (shutil.which("bash") and shutil.which("sha256sum") and shutil.which("awk")):
        pytest.skip("needs bash, sha256sum and awk")
    folder = tmp_path / "weights"
    if case == "repository":
        shutil.copytree(REPO / "weights", folder)
    else:
        folder.mkdir()
        (folder / "README.md").write_text("model card\n")
        model = folder / "rrdg_psnr.safetensors"
        model.write_bytes(b"not really a model")
        digest = _sha256(model)
        sums = {
            "empty_sums_no_weights": "",
            "listed_and_matching": f"{digest}  rrdg_psnr.safetensors\n",
            "binary_mode_line": f"{digest} *rrdg_psnr.safetensors\n",
            "corrupted": f"{digest}  rrdg_psnr.safetensors\n",
            "weights_without_sum": f"{_sha256(folder / 'README.md')}  README.md\n",
            "listed_but_missing": (
                f"{digest}  rrdg_psnr.safetensors\n{digest}  rrdg_gan.safetensors\n"
            ),
        }
        if case in {"empty_sums_no_weights", "no_sums_no_weights"}:
            model.unlink()
        if case != "no_sums_no_weights":
            (folder / "SHA256SUMS").write_text(sums[case])
        if case == "corrupted":
            model.write_bytes(b"flipped bits")
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", _weights_check_run(dockerfile)],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode == 0) is passes, result.stdout + result.stderr


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it: from the context root, ``*`` and ``?``
    within one path element, ``**`` across elements."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a context path is left out: the last pattern matching it or one of its parent
    folders wins, as in Docker."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _docker_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher_follows_docker() -> None:
    assert _dockerignore_excludes(["*.nii.gz"], "a.nii.gz")
    assert not _dockerignore_excludes(["*.nii.gz"], "mrisr_cli/example/a.nii.gz")  # root only
    assert _dockerignore_excludes(["**/*.pyc"], "mrisr_cli/networks/x.pyc")
    assert _dockerignore_excludes(["*", "!mrisr_cli/", "tests"], "tests/test_x.py")
    assert not _dockerignore_excludes(["*", "!mrisr_cli/"], "mrisr_cli/cli.py")


def test_dockerignore_keeps_the_context_small(dockerfile: Dockerfile) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for name in (".venv", ".git", "data", "runs", ".pytest_cache", ".ruff_cache", "mrisr.sif"):
        assert _dockerignore_excludes(patterns, name), f"{name} must be excluded"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.split()
    for stage in dockerfile.stages:
        for value in stage.values("COPY"):
            flags, sources, _ = _copy_args(value)
            if any(f.startswith("--from") for f in flags):
                continue
            for source in sources:
                root = source.strip("/")
                needed = [f for f in tracked if f == root or f.startswith(root + "/")] or [root]
                for path in needed:  # every committed file COPY needs, the demo volume included
                    assert not _dockerignore_excludes(patterns, path), f"COPY {source}: {path}"


# --------------------------------------------------------------------------------------------------
# Singularity.def
# --------------------------------------------------------------------------------------------------


@dataclass
class DefFile:
    header: dict[str, str]
    sections: dict[str, str]


@pytest.fixture(scope="module")
def deffile() -> DefFile:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in SINGULARITY_DEF.read_text().splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip().lower()] = value.strip()
    return DefFile(header, {k: "\n".join(v) for k, v in sections.items()})


def test_def_bootstraps_from_the_docker_image(deffile: DefFile) -> None:
    assert deffile.header["bootstrap"] in {"docker", "docker-daemon", "docker-archive"}
    assert deffile.header["from"] == f"mrisr:{VERSION}"
    assert "post" not in deffile.sections, "one source of truth: install in the Dockerfile only"


def test_def_runscript_and_test(deffile: DefFile) -> None:
    assert 'exec mrisr "$@"' in deffile.sections["runscript"]
    test = deffile.sections["test"]
    assert "mrisr --version" in test
    assert "mrisr selftest --device cpu" in test
    # `apptainer build` and `apptainer test` run on login nodes, shared: not every core
    assert "mrisr selftest --device cpu --threads 1" in test


def test_def_labels(deffile: DefFile) -> None:
    labels = dict(
        line.strip().split(None, 1)
        for line in deffile.sections["labels"].splitlines()
        if line.strip()
    )
    assert labels.get("org.opencontainers.image.version") == VERSION
    assert labels.get("org.opencontainers.image.title") == "mrisr"


def test_def_help(deffile: DefFile) -> None:
    text = deffile.sections["help"]
    assert f"docker build -t mrisr:{VERSION} ." in text
    assert "apptainer build mrisr.sif" in text
    assert "singularity exec --nv --cleanenv --no-home" in text


def _source_environment(deffile: DefFile, tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """The variables that %environment leaves, sourced by /bin/sh in a bare environment."""
    script = tmp_path / "environment.sh"
    script.write_text(deffile.sections["environment"])
    result = subprocess.run(
        ["sh", "-c", '. "$1" && env', "sh", str(script)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_def_environment_under_slurm(deffile: DefFile, tmp_path: Path) -> None:
    env = _source_environment(
        deffile, tmp_path, {"TMPDIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "3"}
    )
    assert env["PYTHONNOUSERSITE"] == "1"
    per_user = f"{tmp_path}/mrisr-{os.getuid()}"
    for name in CACHE_VARS:
        assert env[name].startswith(per_user + "/"), (name, env[name])
    for name in THREAD_VARS:
        assert env[name] == "3", name


def test_def_environment_outside_slurm(deffile: DefFile, tmp_path: Path) -> None:
    env = _source_environment(deffile, tmp_path, {"OMP_NUM_THREADS": "5"})
    assert env["MPLCONFIGDIR"].startswith(f"/tmp/mrisr-{os.getuid()}/")
    assert env["OMP_NUM_THREADS"] == "5", "a value the user set is kept"
    assert "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS" not in env


# --------------------------------------------------------------------------------------------------
# SLURM examples, run with stand-ins for singularity, srun and scontrol
# --------------------------------------------------------------------------------------------------

FAKE_SINGULARITY = """#!/bin/bash
# Records its arguments, one per line, and writes the output file of `mrisr upsample IN OUT`.
printf '%s\\n' "$@" >> "$FAKE_LOG"
echo --- >> "$FAKE_LOG"
args=("$@")
for i in "${!args[@]}"; do
    if [[ "${args[$i]}" == upsample ]]; then touch "${args[$((i + 2))]}"; fi
done
"""

FAKE_SRUN = """#!/bin/bash
# Records its own options, then runs the command as srun would on one node.
while [[ "$1" == --* ]]; do echo "srun $1" >> "$FAKE_LOG"; shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-a17\\ngpu-a18\\n'
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "singularity": FAKE_SINGULARITY,
        "srun": FAKE_SRUN,
        "scontrol": FAKE_SCONTROL,
    }.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(0o755)
    return bin_dir


def _run_example(script: str, args: list[str], env: dict[str, str], tmp_path: Path):
    bin_dir = tmp_path / "bin"
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "calls.log")}
    return subprocess.run(
        ["bash", str(REPO / "examples" / script), *args],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )


def _calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.log"
    if not log.exists():
        return []
    text = log.read_text()
    return [[a for a in chunk.split("\n") if a] for chunk in text.split("---\n") if chunk.strip()]


@pytest.fixture
def subjects(tmp_path: Path) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "sub-01_T1w.nii.gz").write_bytes(b"")
    (inputs / "sub-02_T1w.nii").write_bytes(b"")
    listing = tmp_path / "subjects.txt"
    lines = [f"{inputs}/sub-01_T1w.nii.gz", "", "# a comment", f"{inputs}/sub-02_T1w.nii"]
    listing.write_text("\n".join([*lines, f"{inputs}/gone.nii.gz"]) + "\n")
    _fake_bin(tmp_path)
    return listing


def test_slurm_upsample_runs_its_line(subjects: Path, tmp_path: Path) -> None:
    out = tmp_path / "sr"
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_CPUS_PER_TASK": "6", "CUDA_VISIBLE_DEVICES": "2"}
    first = _run_example("slurm_upsample.sh", [str(subjects), str(out)], env, tmp_path)
    assert first.returncode == 0, first.stderr
    (call,) = _calls(tmp_path)
    assert call[:4] == ["exec", "--nv", "--cleanenv", "--no-home"]
    assert "CUDA_VISIBLE_DEVICES=2" in call and "SLURM_CPUS_PER_TASK=6" in call
    sif = call.index("mrisr.sif")
    expected_out = str(out.resolve() / "sub-01_T1w_sr.nii.gz")
    assert call[sif + 1 :] == [
        "mrisr",
        "upsample",
        str((tmp_path / "in" / "sub-01_T1w.nii.gz").resolve()),
        expected_out,
        "--threads",
        "6",
        "--device",
        "auto",
        "--skip-existing",
    ]
    assert Path(expected_out).exists()

    overwrite = {**env, "MRISR_ARGS": "--overwrite --alpha 0.5"}
    again = _run_example("slurm_upsample.sh", [str(subjects), str(out)], overwrite, tmp_path)
    assert again.returncode == 0, again.stderr
    assert _calls(tmp_path)[-1][-4:] == ["auto", "--overwrite", "--alpha", "0.5"], (
        "--overwrite redoes the subject: no --skip-existing"
    )


def test_slurm_upsample_other_lines(subjects: Path, tmp_path: Path) -> None:
    out = tmp_path / "sr"
    base = {"SLURM_CPUS_PER_TASK": "2", "MRISR_ARGS": "--alpha 0.5"}
    for task in ("2", "3"):  # blank line, comment
        done = _run_example(
            "slurm_upsample.sh",
            [str(subjects), str(out)],
            {**base, "SLURM_ARRAY_TASK_ID": task},
            tmp_path,
        )
        assert done.returncode == 0, done.stderr
    assert _calls(tmp_path) == []

    nii = _run_example(
        "slurm_upsample.sh",
        [str(subjects), str(out)],
        {**base, "SLURM_ARRAY_TASK_ID": "4"},
        tmp_path,
    )
    assert nii.returncode == 0, nii.stderr
    (call,) = _calls(tmp_path)
    assert call[-2:] == ["--alpha", "0.5"]
    assert not any(a.startswith("CUDA_VISIBLE_DEVICES") for a in call), "unset stays unset"
    assert (out / "sub-02_T1w_sr.nii.gz").exists()

    missing = _run_example(
        "slurm_upsample.sh",
        [str(subjects), str(out)],
        {**base, "SLURM_ARRAY_TASK_ID": "5"},
        tmp_path,
    )
    assert missing.returncode != 0
    assert "not found" in missing.stderr


def test_slurm_upsample_refuses_an_index_outside_the_list(tmp_path: Path) -> None:
    """An index past the list "succeeded" doing nothing (a wrong --array unnoticed), 0 gave a
    sed error, and `wc -l`, as documented, left out a last line without a newline."""
    _fake_bin(tmp_path)
    inputs = [tmp_path / "sub-01_T1w.nii.gz", tmp_path / "sub-02_T1w.nii.gz"]
    for path in inputs:
        path.write_bytes(b"")
    listing = tmp_path / "subjects.txt"
    listing.write_text(f"{inputs[0]}\n{inputs[1]}")  # no newline at the end
    out = tmp_path / "sr"

    def task(index: str) -> subprocess.CompletedProcess[str]:
        env = {"SLURM_ARRAY_TASK_ID": index}
        return _run_example("slurm_upsample.sh", [str(listing), str(out)], env, tmp_path)

    for index in ("0", "3"):
        refused = task(index)
        assert refused.returncode != 0, refused.stdout
        assert refused.stderr.strip() == (
            f"task {index}: no such line in {listing} (it has 2; submit with --array=1-2)"
        )
    assert _calls(tmp_path) == []
    last = task("2")
    assert last.returncode == 0, last.stderr
    (call,) = _calls(tmp_path)
    assert str(inputs[1]) in call


def test_the_array_is_sized_with_a_count_of_every_line() -> None:
    """`wc -l` counts newlines: a list without a final one lost its last subject."""
    submit = "sbatch --array=1-\"$(grep -c '' subjects.txt)\"%20 examples/slurm_upsample.sh"
    for path in (REPO / "examples" / "slurm_upsample.sh", REPO / "docs" / "cluster.md"):
        text = path.read_text()
        assert submit in text and "wc -l <" not in text, path


def _one_line_list(tmp_path: Path, line: str) -> Path:
    listing = tmp_path / "subjects.txt"
    listing.write_text(line + "\n")
    _fake_bin(tmp_path)
    return listing


def test_slurm_upsample_follows_links(tmp_path: Path) -> None:
    """A DataLad/git-annex dataset: the listed file is a relative link to a hash-named file."""
    key = "SHA256E-s0--0a1b2c.nii.gz"
    target = tmp_path / "ds" / ".git" / "annex" / "objects" / "Xx" / "Yy" / key / key
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    anat = tmp_path / "ds" / "sub-03" / "anat"
    anat.mkdir(parents=True)
    link = anat / "sub-03_T1w.nii.gz"
    link.symlink_to(os.path.relpath(target, anat))
    listing = _one_line_list(tmp_path, str(link))
    out = tmp_path / "sr"

    done = _run_example(
        "slurm_upsample.sh", [str(listing), str(out)], {"SLURM_ARRAY_TASK_ID": "1"}, tmp_path
    )
    assert done.returncode == 0, done.stderr
    (call,) = _calls(tmp_path)
    real_dir = str(target.parent.resolve())
    assert f"{real_dir}:{real_dir}:ro" in call, "the link's target folder is bound"
    upsample = call[call.index("upsample") :]
    assert upsample[1:3] == [str(target.resolve()), str(out.resolve() / "sub-03_T1w_sr.nii.gz")]

    target.unlink()  # content not fetched (`datalad get` not run): a dangling link
    gone = _run_example(
        "slurm_upsample.sh", [str(listing), str(out)], {"SLURM_ARRAY_TASK_ID": "1"}, tmp_path
    )
    assert gone.returncode != 0
    assert "not found" in gone.stderr and "datalad get" in gone.stderr


REAL_SINGULARITY = """#!/bin/bash
# Runs the command after the image's name with this checkout's mrisr, as the container would.
while [[ "$1" != *.sif ]]; do shift; done
shift 2  # the image, "mrisr"
exec {python} -m mrisr_cli "$@"
"""


def test_slurm_upsample_resumes_and_refuses_a_second_subject_of_the_same_name(
    tmp_path: Path, fast_weights: Path
) -> None:
    """With mrisr itself behind the stand-in: a resubmitted task skips its finished outputs
    (alpha by alpha), and a subject whose file name another subject's output took fails instead
    of being skipped. The list may have Windows line ends."""
    from conftest import head_phantom, write_nifti

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "singularity").write_text(REAL_SINGULARITY.format(python=sys.executable))
    (bin_dir / "singularity").chmod(0o755)
    inputs = []
    for subject in ("subjA", "subjB"):
        path = tmp_path / subject / "mri" / "T1.nii.gz"
        path.parent.mkdir(parents=True)
        inputs.append(write_nifti(path, head_phantom((20, 16, 20), seed=len(inputs))))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\r\n" for p in inputs))
    out = tmp_path / "sr"
    args = f"--psnr-weights {fast_weights} --gan-weights {fast_weights} --device cpu"

    def task(n: int, alphas: str = "0,1") -> subprocess.CompletedProcess[str]:
        env = {"SLURM_ARRAY_TASK_ID": str(n), "MRISR_ARGS": f"{args} --alpha {alphas}"}
        return _run_example("slurm_upsample.sh", [str(listing), str(out)], env, tmp_path)

    first = task(1)
    assert first.returncode == 0, first.stderr
    outputs = sorted(p.name for p in out.glob("*.nii.gz"))
    assert outputs == ["T1_sr_alpha-0.nii.gz", "T1_sr_alpha-1.nii.gz"]
    (out / "T1_sr_alpha-1.nii.gz").unlink()  # a task stopped after its first alpha
    done = (out / "T1_sr_alpha-0.nii.gz").stat().st_mtime_ns
    again = task(1)
    assert again.returncode == 0, again.stderr
    assert "T1_sr_alpha-0.nii.gz: finished by an earlier run" in again.stderr
    assert (out / "T1_sr_alpha-0.nii.gz").stat().st_mtime_ns == done
    assert (out / "T1_sr_alpha-1.nii.gz").exists()

    other = task(2)
    assert other.returncode != 0
    assert f"made by another run (input {inputs[0].resolve()})" in other.stderr
    assert "Traceback" not in other.stderr


@pytest.mark.parametrize("cuda", ["0,1,2,3", None])
def test_slurm_train_starts_torchrun_per_node(tmp_path: Path, cuda: str | None) -> None:
    _fake_bin(tmp_path)
    data, run = tmp_path / "prepared", tmp_path / "runs" / "psnr-01"
    data.mkdir()
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "32",
        "SIF": "/images/mrisr.sif",
    }
    if cuda:
        env["CUDA_VISIBLE_DEVICES"] = cuda
    done = _run_example("slurm_train.sh", [str(data), str(run)], env, tmp_path)
    assert done.returncode == 0, done.stderr

    log = (tmp_path / "calls.log").read_text().splitlines()
    srun_options = [line.removeprefix("srun ") for line in log if line.startswith("srun ")]
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(srun_options)
    (call,) = _calls(tmp_path)
    call = [a for a in call if not a.startswith("srun ")]
    assert call[0] == "exec"
    assert {"--nv", "--cleanenv", "--no-home", "OMP_NUM_THREADS=8"} <= set(call)
    assert (f"CUDA_VISIBLE_DEVICES={cuda}" in call) is bool(cuda)
    torchrun = call[call.index("/images/mrisr.sif") + 1 :]
    assert torchrun[0] == "torchrun"
    assert {
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-a17:24242",
        "--rdzv_id=4242",
    } <= set(torchrun)
    module = torchrun[torchrun.index("-m") :]
    assert module == [
        "-m", "mrisr_cli", "train", "--stage", "psnr",
        "--data", str(data.resolve()), "--out", str(run.resolve()),
    ]  # fmt: skip


def test_slurm_train_continues_a_run_that_has_a_checkpoint(tmp_path: Path) -> None:
    """A job resubmitted after its time limit, or requeued after a preemption, ran a new
    `mrisr train --out RUN`, which a run folder with a checkpoint refuses."""
    _fake_bin(tmp_path)
    data, run = tmp_path / "prepared", tmp_path / "run"
    data.mkdir()
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu-a17", "SLURM_GPUS_ON_NODE": "1"}

    def train_args(extra: str = "") -> list[str]:
        (tmp_path / "calls.log").unlink(missing_ok=True)
        done = _run_example(
            "slurm_train.sh", [str(data), str(run)], {**env, "MRISR_ARGS": extra}, tmp_path
        )
        assert done.returncode == 0, done.stderr
        (call,) = _calls(tmp_path)
        return call[call.index("train") :]

    assert "--resume" not in train_args()
    (run / "checkpoint.pt").write_bytes(b"")
    assert train_args()[-1] == "--resume"
    assert train_args("--resume --epochs 40").count("--resume") == 1
    script = (REPO / "examples" / "slurm_train.sh").read_text()
    assert "#SBATCH --signal=TERM@120" in script, "a checkpoint before the time limit"


# --------------------------------------------------------------------------------------------------
# Slow: the Dockerfile's builder replayed in a fresh venv, then the image's smoke test
# --------------------------------------------------------------------------------------------------


def _local_wheel_dirs() -> list[Path]:
    """Folders pip searches for wheels on this machine (find-links from env and pip config)."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    for line in config.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            links += value.strip().strip("'\"").split()
    local = [link.removeprefix("file://") for link in links]
    return [Path(link) for link in local if "://" not in link]


class Replay:
    """Runs a Dockerfile stage's instructions on this machine, under a stand-in root folder."""

    def __init__(self, stage: Stage, root: Path, shim: Path) -> None:
        self.stage, self.root, self.shim = stage, root, shim
        root.mkdir(parents=True, exist_ok=True)
        self.cwd = root
        self.shell = ["/bin/sh", "-c"]
        self.container_env: dict[str, str] = {}
        self.args: dict[str, str] = {}

    def host_path(self, path: str) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else self.cwd / path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
        env.update(self.args)
        for key, value in self.container_env.items():
            if key == "VIRTUAL_ENV":
                env[key] = str(self.host_path(value))
            elif key != "PATH":
                env[key] = value
        venv = env.get("VIRTUAL_ENV")
        env["PATH"] = os.pathsep.join(
            [f"{venv}/bin"] * bool(venv) + [str(self.shim), os.environ.get("PATH", "")]
        )
        return env

    def copy(self, value: str) -> None:
        flags, sources, dest = _copy_args(value)
        assert not flags, f"the builder copies only from the build context: COPY {value}"
        target = self.host_path(dest)
        for source in sources:
            src = REPO / source
            if not src.exists():
                pytest.fail(f"COPY {source}: not in the repository, so docker build fails too")
            if src.is_dir():
                shutil.copytree(
                    src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)

    def run(self) -> None:
        for instruction, value in self.stage.instructions:
            if instruction == "SHELL":
                self.shell = json.loads(value)
            elif instruction == "ARG":
                name, _, default = value.partition("=")
                self.args[name.strip()] = default.strip().strip('"')
            elif instruction == "ENV":
                self.container_env.update(_env_pairs(value))
            elif instruction == "WORKDIR":
                self.cwd = self.host_path(value)
                self.cwd.mkdir(parents=True, exist_ok=True)
            elif instruction == "COPY":
                self.copy(value)
            elif instruction == "RUN" and "apt-get" not in value:
                command = value
                venv_in_image = self.container_env.get("VIRTUAL_ENV")
                if venv_in_image:
                    command = command.replace(venv_in_image, str(self.host_path(venv_in_image)))
                done = subprocess.run(
                    [*self.shell, command],
                    cwd=self.cwd,
                    env=self.env(),
                    capture_output=True,
                    text=True,
                    timeout=1800,
                    check=False,
                )
                assert done.returncode == 0, (
                    f"RUN {value}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )


@pytest.mark.slow
def test_dockerfile_install_replayed_in_fresh_venv(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The builder's own commands install mrisr in a fresh venv; then the image's smoke test."""
    torch_pin = re.search(r"\btorch==(\S+)", " ".join(dockerfile.builder.values("RUN")))
    assert torch_pin
    version = torch_pin.group(1)
    local = [w for d in _local_wheel_dirs() for w in d.glob(f"torch-{version}*.whl")]
    if not local:
        pytest.skip(
            f"no local wheel of torch {version} (pip find-links): the replay would download "
            "the CUDA build, several GB"
        )

    shim = tmp_path / "shim"
    shim.mkdir()
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    for name in ("python3", "python3.11"):
        (shim / name).symlink_to(base_python)

    replay = Replay(dockerfile.builder, tmp_path / "image", shim)
    replay.run()
    venv = replay.host_path(replay.container_env["VIRTUAL_ENV"])
    mrisr = venv / "bin" / "mrisr"
    assert mrisr.exists(), "the builder's venv has no mrisr console script"

    # The runtime's environment, with /tmp moved under tmp_path.
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    for key, value in dockerfile.envs.items():
        if value.startswith("/tmp/"):
            env[key] = str(tmp_path / value.removeprefix("/"))
        elif key.startswith("PYTHON"):
            env[key] = value
    version_run = subprocess.run(
        [str(mrisr), "--version"], env=env, capture_output=True, text=True, check=False
    )
    assert version_run.returncode == 0, version_run.stderr
    assert VERSION in version_run.stdout

    selftest = subprocess.run(
        [str(mrisr), "selftest", "--device", "cpu"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = selftest.stdout + selftest.stderr
    assert "No such command" not in output, "the installed mrisr has no `selftest` command"
    assert selftest.returncode == 0, output[-3000:]
    # `pip install .` (not editable) carries the shipped weights inside the package
    shipped = sorted(p.name for p in (REPO / "weights").glob("*.safetensors"))
    for name in shipped:
        assert name in output, f"the installed package does not find {name}: {output[-2000:]}"
