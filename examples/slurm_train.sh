#!/bin/bash
# Train mrisr on one or more GPU nodes with PyTorch DistributedDataParallel: srun starts one
# torchrun per node inside the container, and torchrun starts one worker per GPU of that node.
# The nodes meet through torchrun's c10d rendezvous on the job's first host.
#
#   mkdir -p logs
#   sbatch examples/slurm_train.sh /data/prepared /scratch/runs/psnr-01              # one node
#   sbatch --nodes=2 examples/slurm_train.sh /data/prepared /scratch/runs/psnr-01    # two nodes
#
# DATA is a folder made by `mrisr prepare`; RUN is the output folder (checkpoints, logs, weights).
# Once RUN holds checkpoint.pt, the script continues that run (`mrisr train --resume`): submit
# the same command again after a time limit, or let SLURM requeue the job after a preemption
# (`#SBATCH --requeue`, where the site allows it). `--signal=TERM@120` (below) warns the job two
# minutes before its time limit: training finishes its step and writes a checkpoint there.
# Settings from the environment: STAGE (default: psnr), MRISR_ARGS (extra options for
# `mrisr train`), SIF (default: mrisr.sif), SINGULARITY (default: singularity; apptainer works
# too). For NCCL settings (e.g. NCCL_SOCKET_IFNAME on some networks), add them to node_cmd's --env
# list below, since --cleanenv keeps the host's variables out of the container.
#
#SBATCH --job-name=mrisr-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=2-00:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=logs/%x_%j.out

set -euo pipefail

usage="usage: sbatch [--nodes=N] $0 DATA RUN"
data=${1:?$usage}
run=${2:?$usage}
stage=${STAGE:-psnr}
sif=${SIF:-mrisr.sif}
singularity=${SINGULARITY:-singularity}
job_id=${SLURM_JOB_ID:?not inside a SLURM job: $usage}
gpus=${SLURM_GPUS_ON_NODE:?no GPUs in this allocation: request them with --gpus-per-node}
nodes=${SLURM_JOB_NUM_NODES:-1}
cpus=${SLURM_CPUS_PER_TASK:-$gpus}

# Each node's CPUs are shared by its GPU workers.
threads_per_worker=$((cpus / gpus))
if ((threads_per_worker < 1)); then
    threads_per_worker=1
fi

mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
head_node=${hosts[0]:?scontrol show hostnames gave no host}
# A port derived from the job id, so that two jobs sharing a head node do not collide.
port=$((20000 + job_id % 20000))

mkdir -p "$run"
data=$(cd "$data" && pwd -P)
run=$(cd "$run" && pwd -P)

read -r -a extra <<< "${MRISR_ARGS:-}"

# A resubmitted or requeued job continues the run it started (a new run would be refused there).
resume=()
if [[ -e "$run/checkpoint.pt" && " ${extra[*]} " != *" --resume "* ]]; then
    resume=(--resume)
    echo "$run/checkpoint.pt exists: continuing that run (--resume)"
fi

# Run by srun on every node, so that CUDA_VISIBLE_DEVICES is read on that node: --cleanenv drops
# it, and an unset value must stay unset (an empty one would hide every GPU).
# shellcheck disable=SC2016  # expanded by the per-node bash, not here
node_cmd='gpu_env=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpu_env=(--env "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
fi
exec "$1" exec "${gpu_env[@]}" "${@:2}"'

echo "mrisr train --stage $stage: $nodes node(s) x $gpus GPU(s), rendezvous $head_node:$port"
srun --nodes="$nodes" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
    bash -c "$node_cmd" mrisr-node "$singularity" \
    --nv --cleanenv --no-home -B "$data" -B "$run" \
    --env "OMP_NUM_THREADS=$threads_per_worker" \
    "$sif" \
    torchrun \
    --nnodes="$nodes" \
    --nproc_per_node="$gpus" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:$port" \
    --rdzv_id="$job_id" \
    -m mrisr_cli train --stage "$stage" --data "$data" --out "$run" "${resume[@]}" "${extra[@]}"
