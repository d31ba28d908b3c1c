#!/usr/bin/env bash
# Build the SAM2 Refine worker image for NimbusImage.
#
# Picks Dockerfile (NVIDIA CUDA) on x86_64 and Dockerfile_M1 (CPU) on arm64/aarch64, by
# `uname -m`. The build context is the repository root, wherever this is run from.
# See docs/deployment.md.
set -euo pipefail

readonly DEFAULT_TAG="annotations/sam2_refine_worker:latest"
readonly ALL_CHECKPOINTS=(tiny small base_plus large)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Build the SAM2 Refine worker image for NimbusImage (default tag: ${DEFAULT_TAG}).
Uses Dockerfile (NVIDIA CUDA, GPU worker) on x86_64 and Dockerfile_M1 (CPU worker) on
arm64/aarch64.

Options:
  --tag NAME              image name and tag (default: ${DEFAULT_TAG})
  --checkpoints LIST      comma-separated SAM2.1 checkpoints to bake into the image,
                          from: ${ALL_CHECKPOINTS[*]} (default: all four, about 1.6 GB)
  --no-cache              build without Docker's layer cache
  --dry-run               print the docker command instead of running it
  -h, --help              show this help

Exit status: 0 built (or printed), 1 build failed or no Docker engine, 2 bad usage.
EOF
}

die_usage() {
    echo "error: $1" >&2
    echo "Try '$(basename "$0") --help'." >&2
    exit 2
}

validate_checkpoints() {
    local list="$1" item known ok
    [[ -n "${list}" ]] || die_usage "--checkpoints needs at least one of: ${ALL_CHECKPOINTS[*]}"
    [[ "${list}" != *, && "${list}" != ,* && "${list}" != *,,* ]] \
        || die_usage "--checkpoints '${list}' has an empty item"
    local -a items
    IFS=',' read -r -a items <<< "${list}"
    for item in "${items[@]}"; do
        ok=0
        for known in "${ALL_CHECKPOINTS[@]}"; do
            [[ "${item}" == "${known}" ]] && ok=1
        done
        ((ok)) || die_usage "unknown checkpoint '${item}' (choose from: ${ALL_CHECKPOINTS[*]})"
    done
}

tag="${DEFAULT_TAG}"
checkpoints=""
no_cache=0
dry_run=0

while (($# > 0)); do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --tag)
            (($# >= 2)) || die_usage "--tag needs a value"
            tag="$2"
            shift
            ;;
        --tag=*)
            tag="${1#*=}"
            ;;
        --checkpoints)
            (($# >= 2)) || die_usage "--checkpoints needs a value"
            checkpoints="$2"
            validate_checkpoints "${checkpoints}"
            shift
            ;;
        --checkpoints=*)
            checkpoints="${1#*=}"
            validate_checkpoints "${checkpoints}"
            ;;
        --no-cache)
            no_cache=1
            ;;
        --dry-run)
            dry_run=1
            ;;
        *)
            die_usage "unknown option '$1'"
            ;;
    esac
    shift
done

[[ -n "${tag}" ]] || die_usage "--tag needs a non-empty value"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
arch="$(uname -m)"
case "${arch}" in
    x86_64 | amd64) dockerfile="${root}/Dockerfile" ;;
    arm64 | aarch64) dockerfile="${root}/Dockerfile_M1" ;;
    *)
        echo "error: unsupported architecture '${arch}' (x86_64 uses Dockerfile, arm64/aarch64 Dockerfile_M1)" >&2
        exit 1
        ;;
esac

cmd=(docker build --file "${dockerfile}" --tag "${tag}")
((no_cache)) && cmd+=(--no-cache)
[[ -n "${checkpoints}" ]] && cmd+=(--build-arg "CHECKPOINTS=${checkpoints}")
cmd+=("${root}")

if ((dry_run)); then
    printf -v printed '%q ' "${cmd[@]}"
    echo "${printed% }"
    exit 0
fi

if ! command -v docker > /dev/null 2>&1; then
    echo "error: the docker command is not installed; install Docker to build ${tag}" >&2
    exit 1
fi
if ! docker info > /dev/null 2>&1; then
    echo "error: no Docker engine is reachable ('docker info' failed): start Docker, or check DOCKER_HOST and your permission on the Docker socket, then run this again" >&2
    exit 1
fi

echo "Building ${tag} from $(basename "${dockerfile}") (${arch})"
if ! "${cmd[@]}"; then
    echo "error: docker build failed for ${tag}" >&2
    exit 1
fi
echo "Built ${tag}"
