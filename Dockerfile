# syntax=docker/dockerfile:1
#
# NeuronGuard server image.
#   GPU (default): docker build -t neuronguard:0.1.0-cuda .
#   CPU only:      docker build --build-arg VARIANT=cpu -t neuronguard:0.1.0-cpu .
# Both variants ship the built-in organism, so `docker run -p 8000:8000 IMAGE` serves with no mounts.

# Which base stage the runtime stage builds on: cuda | cpu.
ARG VARIANT=cuda

# GPU base: official PyTorch runtime image; its torch 2.13.0+cu126 is used as is (never reinstalled).
# CUDA 12.6 runs on NVIDIA drivers >= 560 (and on >= 525 through minor-version compatibility).
# Blackwell GPUs (sm_120) need the cuda13.0 tag of the same release and a driver >= 580.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime AS base-cuda
ENV NEURONGUARD_DEVICE=cuda

# CPU base: slim Python plus the CPU-only torch wheel, which is ~10x smaller than the CUDA one.
FROM python:3.11.14-slim-bookworm AS base-cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"
ENV NEURONGUARD_DEVICE=cpu

# base-${VARIANT} names one of the two stages above, not a registry image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

# The package needs Python 3.11/3.12 and torch 2.13/2.14: fail the build here, with a clear message,
# if a base image is swapped for one that does not fit. The pin file keeps pip from replacing the
# base image's torch build (e.g. the CUDA one) with another from PyPI.
RUN python -c "import sys, torch; \
v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
assert (3, 11) <= sys.version_info[:2] < (3, 13), 'need Python 3.11/3.12, base has ' + sys.version; \
assert (2, 13) <= v < (2, 15), 'need torch 2.13/2.14, base has ' + torch.__version__; \
print('torch==' + torch.__version__)" > /tmp/torch-pin.txt

# Dependencies first, from pyproject + the exact pins, so code edits reuse this (large) layer.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -c /tmp/torch-pin.txt -r /tmp/requirements.txt

# The package itself, including the built-in organism (models/organism/) and its bundle.
# The source tree stays in /app too, read-only, so repo-relative paths resolve in the container.
COPY . .
RUN pip install --no-deps -c constraints.txt -c /tmp/torch-pin.txt . \
    && python -c "import neuronguard.cli" \
    && neuronguard serve --help > /dev/null

# Non-root runtime user; mount points it owns so named volumes inherit writable ownership.
#   /models   real checkpoints (read-only mount)      /bundles  probe/neuron bundles (read-only mount)
#   /data/hf-cache  Hugging Face cache (HF_HOME), a persistent volume so weights download once
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/neuronguard \
        --shell /usr/sbin/nologin neuronguard \
    && mkdir -p /models /bundles /data/hf-cache \
    && chown neuronguard:neuronguard /models /bundles /data/hf-cache

# Every server setting is a NEURONGUARD_* variable; the model/bundle/patch source default to the
# built-in organism when unset. NEURONGUARD_DEVICE comes from the base stage above.
ENV HF_HOME=/data/hf-cache \
    NEURONGUARD_HOST=0.0.0.0 \
    NEURONGUARD_PORT=8000

# Numeric so runtimes (e.g. Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001
EXPOSE 8000

# /ready is 503 until the model and bundle are loaded; the long start period covers loading a
# large checkpoint. urllib raises on any non-2xx status, so no curl is needed in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('NEURONGUARD_PORT', '8000'), timeout=4)"]

# Arguments given to `docker run IMAGE ...` replace CMD and are appended to `neuronguard serve`.
ENTRYPOINT ["neuronguard", "serve"]
CMD ["--host", "0.0.0.0"]
