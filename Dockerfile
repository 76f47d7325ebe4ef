# syntax=docker/dockerfile:1
#
# One Dockerfile for every role; the pip extra picks what gets installed:
#   docker build --build-arg EXTRAS=web    .   # web + migrate (no TensorFlow)
#   docker build --build-arg EXTRAS=worker .   # CPU worker (tensorflow-cpu)
#   docker build --build-arg EXTRAS=gpu    .   # GPU worker (tensorflow[and-cuda])
#
# The GPU image deliberately uses the same python:3.11-slim base rather than
# nvidia/cuda: the tensorflow[and-cuda] wheels ship CUDA and cuDNN as nvidia-*
# pip packages that TensorFlow finds on its own, so the only thing needed from
# the host is the NVIDIA driver, which the NVIDIA Container Toolkit mounts in at
# run time. That keeps one base, one Python and one set of system packages.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# --- builder: resolve and install the Python dependencies into a venv --------
# Kept in its own stage so pip's build leftovers and /src stay out of the
# runtime image; only /opt/venv is copied across.
FROM base AS builder
ARG EXTRAS=worker
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
# The client distribution (client/) too: `ser submit|status|history` come from it.
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir ./client ".[${EXTRAS}]"

# --- runtime ------------------------------------------------------------------
FROM base AS runtime
ARG EXTRAS=worker

# ffmpeg: the worker decodes m4a/webm through it and web probes uploads with
# ffprobe. libsndfile1: soundfile. flac: encodes audio for Google speech-to-text.
# (libpq comes with psycopg[binary].)
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libsndfile1 flac \
 && rm -rf /var/lib/apt/lists/*

# Fixed uid/gid so ownership of the shared volume is the same in every image.
RUN groupadd --system --gid 10001 ser \
 && useradd --system --uid 10001 --gid ser --create-home --home-dir /home/ser \
            --shell /usr/sbin/nologin ser

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# The repo stays root-owned (read-only to the service user). It is still needed
# at run time for alembic.ini, migrations/ and the model artifacts in models/.
COPY . /app

# A fresh named volume is initialised from the image's directory, including its
# owner, so creating /data here is what makes the volume writable by `ser`.
RUN mkdir -p /data/uploads && chown -R ser:ser /data

# PYTHONPATH: the settings find alembic.ini, migrations/ and models/ relative
# to the imported ser_shared package, so the project must be imported from
# /app and not from the copy pip put in site-packages (which lacks them).
# NUMBA_CACHE_DIR: numba (via librosa) caches compiled functions next to its
# sources by default, which is not writable by the non-root user.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    SER_DATA_DIR=/data \
    SER_STORAGE_DIR=/data/uploads \
    SER_MODELS_DIR=/app/models \
    NUMBA_CACHE_DIR=/tmp/numba-cache

LABEL org.opencontainers.image.title="ser" \
      org.opencontainers.image.description="Speech emotion recognition job service (extras: ${EXTRAS})"

USER ser
EXPOSE 8000
CMD ["ser", "web", "--host", "0.0.0.0", "--port", "8000"]
