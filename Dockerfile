# syntax=docker/dockerfile:1
# One image for all five services: compose and Kubernetes pick the module per container.
#   docker build -t apex-serve:cpu .                                CPU (default)
#   docker build --build-arg VARIANT=cuda -t apex-serve:cuda .      CUDA runtime base + the `cuda` extra (cupy)
# Run alone, the image starts the whole stack in one container (`apex-serve up`):
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:50051:50051 --shm-size 512m apex-serve:cpu
ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# Python per variant. Both end with a venv at /opt/venv, so `python` and `pip` mean the same below.
FROM python:3.11-slim AS python-cpu
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS python-cuda
# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11); its headers are added in the build stage only.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

FROM python-${VARIANT} AS base
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# Build: the same steps as scripts/setup.sh. torch first and pinned exactly (the project pins the
# same version, so nothing later can pull another torch), then an editable install: setup.py
# generates the protobuf code and compiles the C++ kernel in place (per-file ISA flags dispatched at
# run time, so the image runs on any x86-64). The venv and /app move to the final stage at the same
# paths; the compiler does not.
FROM base AS build
ARG VARIANT
RUN apt-get update && apt-get install -y --no-install-recommends g++ $([ "$VARIANT" = cuda ] && echo python3-dev) \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "torch==2.13.0"
WORKDIR /app
COPY . .
RUN if [ "$VARIANT" = cuda ]; then extras="[cuda]"; else extras=""; fi && pip install -e ".${extras}"
RUN apex-serve make-model --preset default --out /models/apex-tiny-llama

FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=build /models /models
# compose's health checks (Kubernetes probes gRPC health natively).
COPY deploy/docker/healthcheck.py /opt/apex/healthcheck.py
# One non-root uid for every service: the shared-memory regions are created 0600, so the two
# workers must run as the same user. /run/apex (sockets) and the profile store are owned by it
# so that named volumes mounted there inherit that ownership.
RUN useradd --uid 10001 --user-group --create-home apex \
    && mkdir -p /run/apex /var/lib/apex/profiles && chown apex:apex /run/apex /var/lib/apex/profiles
USER 10001
WORKDIR /home/apex
ENV APEX_LOG_LEVEL=INFO
EXPOSE 50051 8000 9400
CMD ["apex-serve", "up", "--model-dir", "/models/apex-tiny-llama", "--host", "0.0.0.0", \
     "--run-dir", "/tmp/apex-run", "--profile-dir", "/var/lib/apex/profiles"]
