#!/bin/bash
# Super-resolve many subjects with a SLURM job array: one array task per line of a list file.
#
#   find /data/study -name '*_T1w.nii.gz' > subjects.txt
#   mkdir -p logs
#   sbatch --array=1-"$(wc -l < subjects.txt)"%20 examples/slurm_upsample.sh subjects.txt /data/sr
#
# Each line of the list is one input NIfTI path (blank lines and lines starting with # are
# skipped). Task N reads line N and writes OUTDIR/<input name without .nii[.gz]>_sr.nii.gz, so
# input file names must be unique (BIDS names are). A subject whose output already exists is
# skipped: resubmitting the same array after a failure redoes only what is missing. "%20" caps
# how many tasks run at once.
#
# Settings from the environment: SIF (default: mrisr.sif), MRISR_ARGS (extra options for
# `mrisr upsample`, e.g. "--alpha 0.5"), SINGULARITY (default: singularity; apptainer works too).
#
#SBATCH --job-name=mrisr-upsample
#SBATCH --array=1-1
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

in=$(sed -n "${task}p" "$list")
if [[ -z "${in//[[:space:]]/}" || "$in" == \#* ]]; then
    echo "task $task: line $task of $list is empty or a comment; nothing to do"
    exit 0
fi
if [[ ! -f "$in" ]]; then
    echo "task $task: input not found: $in" >&2
    exit 1
fi

name=$(basename "$in")
name=${name%.gz}
name=${name%.nii}
mkdir -p "$outdir"
out="$outdir/${name}_sr.nii.gz"
if [[ -e "$out" ]]; then
    echo "task $task: $out exists; skipping $in"
    exit 0
fi

# Bind the input's folder read-only and the output folder read-write, at the same paths inside.
in_dir=$(cd "$(dirname "$in")" && pwd -P)
out_dir=$(cd "$outdir" && pwd -P)
in="$in_dir/$(basename "$in")"
out="$out_dir/${name}_sr.nii.gz"
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

read -r -a extra <<< "${MRISR_ARGS:-}"

echo "task $task on $(hostname): $in -> $out"
"$singularity" exec --nv --cleanenv --no-home \
    "${bind_args[@]}" "${env_args[@]}" \
    "$sif" \
    mrisr upsample "$in" "$out" --threads "$threads" --device auto "${extra[@]}"
