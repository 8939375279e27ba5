# syntax=docker/dockerfile:1
#
# mrisr: 3D T1 brain MRI super-resolution, as a container for workstations and HPC clusters.
#
#   docker build -t mrisr:0.1.0 .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD":/data mrisr:0.1.0 upsample in.nii.gz out.nii.gz
#   apptainer build mrisr.sif Singularity.def        # SIF for clusters, from this image
#
# Base image and CUDA: a dated Debian bookworm tag (pins the whole OS layer to one day) with
# Debian's own Python 3.11, and torch's CUDA build taken from PyPI. The PyPI wheel of torch 2.13.0
# for Linux x86_64 is built against CUDA 13.0 and brings its own CUDA runtime, cuBLAS, cuDNN 9 and
# NCCL as pip packages (cuda-toolkit 13.0.3, nvidia-cudnn-cu13, nvidia-nccl-cu13), so an
# nvidia/cuda base image would only ship a second, unused copy of the CUDA libraries. The only
# thing the host must provide is the NVIDIA driver, which `docker run --gpus` and
# `singularity exec --nv` bind in: CUDA 13.0 needs driver branch R580 or newer. For a cluster with
# an older driver, build with a torch index of an older CUDA, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...
# (check first that this torch version is published for that CUDA).
#
# Every Python package ships its native libraries in its wheel (checked with readelf: beyond glibc
# they need only libstdc++, libgcc_s and zlib, all in the base image), so the runtime stage installs
# nothing from apt but the Python interpreter.
#
# tests/test_containers.py parses this file and replays the builder's RUN lines (all but apt) in a
# fresh venv: keep the install commands as plain `pip install ...` lines using $VIRTUAL_ENV.

########################################################################################################
# Builder: a virtual environment with torch and mrisr, copied whole into the runtime stage.
########################################################################################################
FROM debian:bookworm-20260824-slim AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3.11-venv brings ensurepip (Debian splits it out of the interpreter).
# DL3008 (pin apt versions) is ignored on purpose, here and below: the dated base tag pins the OS,
# while an exact Debian version such as 3.11.2-6+deb12uN leaves the mirror at the next security
# update and would break every later build. The packages are Debian's own Python 3.11.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/mrisr/venv \
    PATH=/opt/mrisr/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# bookworm's ensurepip brings pip 23.0.1: pin a current pip, so every build uses the same
# installer. Only pip and torch are pinned: mrisr's other dependencies (and torch's own) resolve
# to the newest versions that pyproject.toml (and torch's requirements) allow on the day of the
# build, so two builds on different days can differ.
RUN python3.11 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir pip==26.3

# Where the torch wheel comes from: PyPI (its CUDA 13.0 build on Linux x86_64) unless the header's
# case of an older driver applies.
ARG TORCH_INDEX_URL=https://pypi.org/simple

# torch first and alone: its multi-GB layer stays cached while mrisr's sources change.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0

# The wheel carries the weights too (package data, for `pip install` users); the runtime stage
# keeps its own verified copy in /opt/mrisr/weights and points MRISR_WEIGHTS at it.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY weights/ weights/
COPY mrisr_cli/ mrisr_cli/
RUN pip install --no-cache-dir .

########################################################################################################
# Runtime: interpreter, the venv, the weights. No compilers, no pip cache, no build files.
########################################################################################################
FROM debian:bookworm-20260824-slim AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Set `--build-arg VCS_REF=$(git rev-parse HEAD)` to record the commit the image was built from.
ARG VCS_REF=unknown
# The public repository address, recorded as a label: pass --build-arg SOURCE_URL=<address>.
ARG SOURCE_URL=unknown

LABEL org.opencontainers.image.title="mrisr" \
      org.opencontainers.image.description="3D T1 brain MRI super-resolution (RRDG generator, patch-GAN, parameter blending) as a command-line tool" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-20260824-slim"

# The venv's python is a link to /usr/bin/python3.11: the same interpreter as in the builder.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 mrisr \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mrisr

COPY --from=builder /opt/mrisr/venv /opt/mrisr/venv

# Shipped generator weights (found through MRISR_WEIGHTS, set below), owned by root, read-only to
# the user. Every *.safetensors must be listed in SHA256SUMS and match it; an empty or absent
# SHA256SUMS is accepted only while no weight file exists.
COPY weights/ /opt/mrisr/weights/
WORKDIR /opt/mrisr/weights
RUN if grep -q '[^[:space:]]' SHA256SUMS 2>/dev/null; then \
        sha256sum --check --strict SHA256SUMS; \
    else \
        echo "weights/SHA256SUMS lists no file: nothing to verify"; \
    fi \
 && for f in *.safetensors; do \
        [ -e "$f" ] || continue; \
        awk -v f="$f" '$2 == f || $2 == "*" f { found = 1 } END { exit !found }' SHA256SUMS 2>/dev/null \
            || { echo "weights/$f has no line in weights/SHA256SUMS" >&2; exit 1; }; \
    done

# PYTHONNOUSERSITE: packages in a user's ~/.local (Singularity mounts $HOME) never shadow the
# image's. Caches and configuration go to /tmp so that a read-only image works
# (`docker run --read-only --tmpfs /tmp`); Singularity.def moves them under ${TMPDIR:-/tmp}, per
# user, at run time. Thread counts are not set here: mrisr derives them from --threads or
# SLURM_CPUS_PER_TASK (mrisr_cli/threads.py), and a value baked in would override both.
ENV PATH=/opt/mrisr/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/mrisr/venv \
    MRISR_WEIGHTS=/opt/mrisr/weights \
    PYTHONNOUSERSITE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/mrisr/matplotlib \
    XDG_CACHE_HOME=/tmp/mrisr/cache \
    XDG_CONFIG_HOME=/tmp/mrisr/config \
    TORCH_HOME=/tmp/mrisr/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/mrisr/torchinductor \
    TRITON_CACHE_DIR=/tmp/mrisr/triton \
    CUDA_CACHE_PATH=/tmp/mrisr/nv

WORKDIR /data
USER 1000:1000

# Build-time smoke test, as the runtime user: the CLI starts, and a tiny random network degrades and
# upsamples a synthetic volume on the CPU. Its cache files are removed so the image starts clean.
RUN mrisr --version \
 && mrisr selftest --device cpu \
 && rm -rf /tmp/mrisr

ENTRYPOINT ["mrisr"]
CMD ["--help"]
