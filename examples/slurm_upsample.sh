#!/bin/bash
# Super-resolve many subjects with a SLURM job array: one array task per line of a list file.
#
#   find /data/study -name '*_T1w.nii.gz' > subjects.txt
#   mkdir -p logs
#   sbatch --array=1-"$(grep -c '' subjects.txt)"%20 examples/slurm_upsample.sh subjects.txt /data/sr
#
# Each line of the list is one input image path (.nii.gz, .nii, .mgz or .mgh; blank lines and
# lines starting with # are skipped). `grep -c ''` counts the lines, the last one too where the
# file does not end in a newline (`wc -l` does not); an index past the list, or 0, is an error.
# Task N reads line N and writes
# OUTDIR/<input name without its suffix>_sr.nii.gz, or, for several alphas (MRISR_ARGS="--alpha
# 0,1"), one <name>_sr_alpha-<alpha>.nii.gz per alpha, as mrisr names them. Input file names must
# be unique (BIDS names are): a task whose output another input made fails, naming that one. Outputs
# a task finished are skipped (mrisr upsample --skip-existing): resubmitting the same array after
# a failure redoes only what is missing, alpha by alpha; MRISR_ARGS="--overwrite" redoes all.
# Symbolic links (DataLad/git-annex datasets) are followed: the file they point to is what the
# container reads. "%20" caps how many tasks run at once.
#
# Settings from the environment: SIF (default: mrisr.sif), MRISR_ARGS (extra options for
# `mrisr upsample`, e.g. "--alpha 0.5"), SINGULARITY (default: singularity; apptainer works too).
#
#SBATCH --job-name=mrisr-upsample
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x_%A_%a.out

set -euo pipefail

usage="usage: sbatch --array=1-N $0 LIST_FILE OUTDIR"
list=${1:?$usage}
outdir=${2:?$usage}
sif=${SIF:-mrisr.sif}
singularity=${SINGULARITY:-singularity}
task=${SLURM_ARRAY_TASK_ID:?not an array task: $usage}
threads=${SLURM_CPUS_PER_TASK:-1}

if [[ ! -f "$list" || ! -r "$list" ]]; then
    echo "task $task: cannot read the list $list" >&2
    exit 1
fi
# A task beyond the list would otherwise succeed doing nothing, and hide a wrong --array.
lines=$(grep -c '' "$list" || true)
if ((lines == 0)); then
    echo "task $task: the list $list is empty" >&2
    exit 1
fi
if [[ ! "$task" =~ ^[0-9]+$ ]] || ((10#$task < 1 || 10#$task > lines)); then
    echo "task $task: no such line in $list (it has $lines; submit with --array=1-$lines)" >&2
    exit 1
fi
task=$((10#$task))

in=$(sed -n "${task}p" "$list")
in=${in%$'\r'} # a list written on Windows
if [[ -z "${in//[[:space:]]/}" || "$in" == \#* ]]; then
    echo "task $task: line $task of $list is empty or a comment; nothing to do"
    exit 0
fi
if [[ ! -f "$in" ]]; then
    hint=""
    if [[ -L "$in" ]]; then
        hint=" (a symbolic link to a missing file: in a DataLad dataset, run datalad get first)"
    fi
    echo "task $task: input not found: $in$hint" >&2
    exit 1
fi

# The output name comes from the listed name: a git-annex link points to a file named by its hash.
name=$(basename "$in")
lower=${name,,}
for suffix in .nii.gz .nii .mgz .mgh; do
    if [[ "$lower" == *"$suffix" ]]; then
        name=${name:0:${#name}-${#suffix}}
        break
    fi
done

read -r -a extra <<< "${MRISR_ARGS:-}"

# mrisr decides what is done: with --skip-existing it skips an output whose sidecar records this
# input, alpha and weights, runs the alphas still missing, and fails on an output that another
# input or run made (two subjects with one file name). --overwrite in MRISR_ARGS redoes all.
resume=(--skip-existing)
for arg in "${extra[@]}"; do
    if [[ "$arg" == --overwrite ]]; then resume=(); fi
done
mkdir -p "$outdir"
out_dir=$(cd "$outdir" && pwd -P)
out="$out_dir/${name}_sr.nii.gz"

# Bind the input's folder read-only and the output folder read-write, at the same paths inside.
# The input is resolved first: a link's own folder would not hold the file it points to.
in=$(readlink -f "$in")
in_dir=$(dirname "$in")
bind_args=(-B "$out_dir")
if [[ "$in_dir" != "$out_dir" ]]; then
    bind_args=(-B "$in_dir:$in_dir:ro" "${bind_args[@]}")
fi

# --cleanenv drops the host's variables: pass on the GPUs SLURM assigned (unset means none were
# restricted; an empty value would hide every GPU) and the CPU count.
env_args=(--env "SLURM_CPUS_PER_TASK=$threads")
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    env_args+=(--env "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
fi

echo "task $task on $(hostname): $in -> $out"
"$singularity" exec --nv --cleanenv --no-home \
    "${bind_args[@]}" "${env_args[@]}" \
    "$sif" \
    mrisr upsample "$in" "$out" --threads "$threads" --device auto "${resume[@]}" "${extra[@]}"
