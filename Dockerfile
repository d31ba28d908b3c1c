# SAM2 Refine: NimbusImage annotation worker image, x86_64 with an NVIDIA GPU (CUDA 13.0).
#
# Build from the repository root (the build context):
#     ./build_workers.sh                           # -> annotations/sam2_refine_worker:latest
#     ./build_workers.sh --checkpoints small       # fewer checkpoints, smaller image
# or  docker build -f Dockerfile -t annotations/sam2_refine_worker:latest .
#
# Stages:
#   checkpoints  downloads the SAM2.1 checkpoints and verifies their SHA-256
#                (scripts/download_checkpoints.py, standard library only)
#   builder      a virtual environment with the pinned dependencies (requirements/docker.txt)
#                and this package; sam2 is installed after torch without build isolation and
#                without its optional CUDA extension (SAM2_BUILD_CUDA=0)
#   final        the CUDA runtime image + python3 + the venv and checkpoints copied in:
#                no compiler, no pip cache, runs as a non-root user
#
# Running needs the NVIDIA container toolkit and a driver that supports CUDA 13.0 (>= 580);
# the base image's NVIDIA_REQUIRE_CUDA makes the toolkit refuse older drivers up front.

# ---------------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS checkpoints

# Comma-separated subset of tiny,small,base_plus,large (build_workers.sh --checkpoints).
ARG CHECKPOINTS=tiny,small,base_plus,large

COPY scripts/download_checkpoints.py /tmp/download_checkpoints.py
RUN python3 /tmp/download_checkpoints.py --dest /code/sam2/checkpoints --models "${CHECKPOINTS}"

# ---------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS builder

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

WORKDIR /src
COPY requirements/docker.txt requirements/docker.txt
# 1. torch first (sam2's build step imports it); versions come from the pin file (-c),
#    which hadolint cannot see (DL3013).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c requirements/docker.txt setuptools torch torchvision
# 2. sam2: source only; no second torch, no optional _C extension. One RUN per step
#    (DL3059) so that the build log shows which step failed.
# hadolint ignore=DL3013,DL3059
RUN SAM2_BUILD_CUDA=0 pip install --no-cache-dir --no-build-isolation -c requirements/docker.txt sam2
# 3. everything else, pinned.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir -r requirements/docker.txt
# 4. this package, against exactly those pins; pip check proves the set is consistent.
COPY pyproject.toml README.md ./
COPY sam2_refine ./sam2_refine
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check

# ---------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin worker

COPY --from=builder /opt/venv /opt/venv
COPY --from=checkpoints /code/sam2/checkpoints /code/sam2/checkpoints
COPY entrypoint.py /code/entrypoint.py

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SAM2_CHECKPOINT_DIR=/code/sam2/checkpoints

# Fail the build, not the first job, when a library or a layer of the package is missing from the final image.
RUN python3 -c "import sam2_refine.cli, sam2_refine.job.compute, sam2_refine.model.sam2_model, sam2_refine.model.fast_decoder, sam2, torch, torchvision, cv2, shapely, skimage, tifffile, girder_client"

# Read by the NimbusImage server to list and route the worker: they must equal
# sam2_refine.worker_info.docker_labels(gpu=True) (tests/test_packaging.py checks it).
LABEL isUPennContrastWorker="" \
      isAnnotationWorker="" \
      isGPUWorker="true" \
      interfaceName="SAM2 Refiner" \
      interfaceCategory="SAM2" \
      description="Refines existing annotations with SAM2: each polygon's or rectangle's box, or each point, prompts the model, and the mask becomes a clean polygon that follows the object's boundary" \
      annotationShape="polygon" \
      defaultToolName="SAM2 Refiner" \
      com.nvidia.volumes.needed="nvidia_driver"

USER 10001:10001
WORKDIR /code
# The server's arguments (--apiUrl ... --request ... --parameters ...) pass through unchanged;
# stdout is unbuffered (PYTHONUNBUFFERED) so progress lines reach the job log at once.
ENTRYPOINT ["/opt/venv/bin/python3", "/code/entrypoint.py"]
