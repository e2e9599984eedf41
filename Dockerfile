# syntax=docker/dockerfile:1
# ctrserve images, one multi-stage build; every Python dependency is pinned by
# requirements/constraints.txt, the file scripts/setup.sh and CI install with.
#
#   docker build --target builder -t ctrserve-builder .  # training + export (CPU torch); builds
#                                                         # the demo package (its default command)
#   docker build -t ctrserve .                            # serving, CPU (the last stage)
#   docker build --target gpu -t ctrserve:gpu .           # serving with onnxruntime-gpu's CUDA 13
#                                                         # and cuDNN 9 libraries (NVIDIA runtime)
#
# Every image runs as the non-root user ctrserve (uid 10001). The serving images read the model
# repository from the volume /models (REPO/NAME/VERSION/ packages), or from S3-compatible storage
# with CTRSERVE_REPO=s3://BUCKET/PREFIX (the s3 extra, boto3, is installed for it), and listen on
# 0.0.0.0:8000.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- base: Python, the user, and the pinned versions -------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 ctrserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin ctrserve
WORKDIR /app
COPY requirements/constraints.txt requirements/constraints.txt

# -- builder: training and export (torch from PyTorch's CPU wheel index) -----------------------
FROM base AS builder
# torch alone from the CPU index (the pinned version; no multi-GB CUDA build), then the rest of
# the training extra from PyPI under the same constraints, which the installed torch satisfies.
# (The version is read from the constraints, where the linter cannot see it: DL3013.)
# hadolint ignore=DL3013
RUN TORCH="$(grep -E '^torch==' requirements/constraints.txt)" \
    && test -n "$TORCH" \
    && pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "$TORCH"
COPY pyproject.toml README.md ./
COPY ctrserve ctrserve
COPY models models
COPY export export
COPY service service
COPY loadtest loadtest
RUN pip install -c requirements/constraints.txt ".[train]" \
    && mkdir -p /runs/demo/repo \
    && chown -R ctrserve:ctrserve /runs
USER 10001:10001
WORKDIR /runs
# The demo package: generate, train, evaluate, export into /runs/demo/repo/demo/1 (a volume
# under docker compose), score five rows through the API once, and exit.
CMD ["ctrserve", "demo", "--workdir", "/runs/demo", "--once", "--port", "0"]

# -- serving-base: the service and what it imports, nothing else ----------------------------------
# No training code, no load tests, no torch: tests/test_packaging.py serves a package from
# exactly the files these COPY lines name (with the links the RUN makes).
FROM base AS serving-base
COPY pyproject.toml README.md ./
COPY ctrserve/__init__.py ctrserve/__main__.py ctrserve/cli.py ctrserve/tables.py ctrserve/
COPY models/__init__.py models/keys.py models/schema.py models/transform.py models/
COPY export/__init__.py export/package.py export/
COPY service service
RUN ln -s ../models ../export ../service ctrserve/ \
    && pip install -c requirements/constraints.txt ".[s3]" \
    && mkdir -p /models \
    && chown ctrserve:ctrserve /models
ENV CTRSERVE_REPO=/models \
    CTRSERVE_HOST=0.0.0.0 \
    CTRSERVE_PORT=8000
VOLUME ["/models"]
EXPOSE 8000
# Healthy means ready, not merely live: every model the replica is to serve is loaded (a 503
# from /v2/health/ready raises, and the check fails). docker compose starts the balancer once
# the replicas are healthy. The start period covers loading large models.
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('CTRSERVE_PORT', '8000'), timeout=2)"]
USER 10001:10001
WORKDIR /home/ctrserve
CMD ["ctrserve", "serve"]

# -- gpu: serving on CUDA ----------------------------------------------------------------------
# onnxruntime-gpu's CUDA 13 and cuDNN 9 libraries come as NVIDIA's wheels (the gpu extra,
# versions pinned by the constraints); the dynamic loader is told where they are. The
# driver (libcuda) comes from the host through the NVIDIA container runtime. nvidia-ml-py feeds
# the GPU gauges. The host needs what the pinned onnxruntime-gpu 1.31.1 (built with CUDA 13.0)
# needs: an NVIDIA driver of branch 580 (580.65.06) or later, and a GPU of compute capability
# 7.5 (Turing, the oldest), 8.0, 8.6, 8.9, 9.0 or 12.0: its CUDA provider carries code for those
# and no PTX. The pinned wheels offer no CUDA 12 variant. docs/gpu.md has the sources.
FROM serving-base AS gpu
USER 0:0
RUN pip install -c /app/requirements/constraints.txt "/app[gpu]" \
    && python -c "import pathlib, sysconfig; root = pathlib.Path(sysconfig.get_paths()['purelib'], 'nvidia'); print('\n'.join(sorted({str(p.parent) for p in root.rglob('lib*.so*')})))" \
        > /etc/ld.so.conf.d/nvidia-wheels.conf \
    && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CTRSERVE_PROVIDER=cuda
USER 10001:10001

# -- serving (default): CPU ----------------------------------------------------------------------
FROM serving-base AS serving
