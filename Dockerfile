# One image for every role: a shard (the default command), the demo and trainers.
#
#   docker build -t sparseps:latest .
#   docker run --rm -p 50051:50051 -p 50061:50061 -p 9400:9400 sparseps:latest
#       # one shard: gRPC 50051, data plane 50061, /metrics 9400. The data port is advertised to
#       # clients as the container's port: publish it as the same number (or set SPARSEPS_DATA_PORT).
#   docker run --rm sparseps:latest sparseps demo --address HOST:50051     # a trainer
#
# Offline builds (CI): put wheels in deploy/wheels/ (see docs/deploy.md) and add
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/deploy/wheels
# GPU shards, the cuda backend (fused CUDA kernels; chosen automatically when a CUDA device is
# visible; run with --gpus / nvidia.com/gpu, the driver comes from the host):
#   --build-arg EXTRAS=server,cuda
# GPU shards on the TensorFlow backend (set SPARSEPS_BACKEND to it):
#   --build-arg EXTRAS=server,gpu
# Replicated shards (--coordinator etcd://..., deploy/k8s/replicated, docs/replication.md):
#   --build-arg EXTRAS=server,replication
# Every SPARSEPS_* variable is a sparseps-server flag (`sparseps-server --help`).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=
ARG EXTRAS=server
ENV PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_FIND_LINKS=${PIP_FIND_LINKS} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/opt/numba-cache
COPY . /src
# The numba kernels are compiled here once, so a shard starts serving in about a second.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "/src[${EXTRAS}]" \
    && /opt/venv/bin/sparseps-server --compile-kernels

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /opt/numba-cache /opt/numba-cache
RUN groupadd --system --gid 10001 sparseps \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin sparseps \
    && mkdir /data && chown 10001:10001 /data
# glibc malloc settings the server would otherwise re-execute itself to get (see server/main.py).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    MALLOC_MMAP_THRESHOLD_=268435456 \
    MALLOC_TRIM_THRESHOLD_=536870912 \
    MALLOC_TOP_PAD_=67108864 \
    SPARSEPS_HOST=0.0.0.0 \
    SPARSEPS_PORT=50051 \
    SPARSEPS_DATA_PORT=50061 \
    SPARSEPS_METRICS_PORT=9400
USER 10001
WORKDIR /data
EXPOSE 50051 50061 9400
# Asks the gRPC health service on 127.0.0.1:$SPARSEPS_PORT; NOT_SERVING while draining.
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
    CMD ["python3", "-m", "sparseps.server.healthcheck", "--quiet", "--timeout", "3"]
# The server drains on SIGTERM (health NOT_SERVING, in-flight calls finish, final checkpoint).
STOPSIGNAL SIGTERM
CMD ["sparseps-server"]
