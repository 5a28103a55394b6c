# comfy-worker as a container image: docker build and podman/buildah build both read this file.
#
#   make wheelhouse                        # the dependencies as wheels, for the base's Python
#   docker build --build-arg BASE_IMAGE=<your CUDA + PyTorch + ComfyUI image> -t comfy-worker .
#   docker build --target with-comfyui ... # also ComfyUI from a checkout in ./ComfyUI
#
# BASE_IMAGE needs python3 (3.10 or newer) with its venv module and tini at /usr/bin/tini
# (Debian and Ubuntu: `apt-get install python3-venv tini`). docs/container.md says more.
# Nothing is downloaded while building: the dependencies come from ./wheelhouse, and the
# project's own wheel is built from this folder with the build tools found there too.

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# --- build: the project's wheel, from source, then the venv, from wheels alone ----------------
FROM ${BASE_IMAGE} AS build
ARG PYTHON=python3
# A digest of the build context, when the builder gives one: buildah 1.28 (Debian 12's podman)
# reuses a cached COPY of a folder whose files changed; a new digest makes this layer new, and
# with it every one after it. Empty (docker), it changes nothing.
ARG SOURCE_DIGEST=
RUN : "${SOURCE_DIGEST}"
COPY wheelhouse/ /wheels/
COPY pyproject.toml README.md /src/
COPY api/ /src/api/
COPY benchmark/ /src/benchmark/
COPY config/ /src/config/
COPY simulator/ /src/simulator/
COPY supervisor/ /src/supervisor/
RUN ${PYTHON} -m venv /opt/build \
 && /opt/build/bin/pip install --no-index --find-links /wheels --no-cache-dir -q \
      --upgrade "setuptools>=77" wheel \
 && /opt/build/bin/pip wheel --no-index --find-links /wheels --no-build-isolation --no-deps \
      --no-cache-dir -q -w /dist /src
# The venv comfy-worker runs from: the project's wheel and its dependencies' wheels, no index,
# no network. It gets no pip or setuptools of its own (the build venv's pip installs into it),
# and only the venv goes on to the image: the wheels never become one of its layers.
RUN ${PYTHON} -m venv --without-pip /opt/comfy-worker/venv \
 && /opt/build/bin/pip --python /opt/comfy-worker/venv/bin/python install --no-index \
      --find-links /wheels --no-cache-dir --no-compile -q /dist/comfy_worker-*.whl \
 && /opt/comfy-worker/venv/bin/python -m compileall -q /opt/comfy-worker/venv/lib \
 && /opt/comfy-worker/venv/bin/comfy-worker --help >/dev/null

# --- common: the runtime, and everything both images share -----------------------------------
FROM ${BASE_IMAGE} AS common
ARG UID=10001
ARG SOURCE_DIGEST=
RUN : "${SOURCE_DIGEST}" \
 && test -x /usr/bin/tini || { echo "BASE_IMAGE has no /usr/bin/tini: install tini in it" >&2; \
      exit 1; }
COPY --from=build /opt/comfy-worker/venv/ /opt/comfy-worker/venv/
COPY misc/container/live.py /opt/comfy-worker/live.py
# A user of its own (no login, no home outside the state folder), and the folders it writes:
# the state (benchmark cache, results, webhook spool), the children's logs, ComfyUI's outputs,
# and the admin socket's folder.
RUN (getent group ${UID} >/dev/null || groupadd --gid ${UID} comfy-worker) \
 && (getent passwd ${UID} >/dev/null || useradd --uid ${UID} --gid ${UID} \
      --home-dir /var/lib/comfy-worker --no-create-home --shell /usr/sbin/nologin comfy-worker) \
 && install -d -o ${UID} -g ${UID} -m 0750 /var/lib/comfy-worker /var/log/comfy-worker \
      /run/comfy-worker \
 && install -d -o ${UID} -g ${UID} -m 0755 /opt/ComfyUI /opt/ComfyUI/output
ENV PATH=/opt/comfy-worker/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/comfy-worker \
    WORKER_STATE_DIR=/var/lib/comfy-worker \
    WORKER_LOG_DIR=/var/log/comfy-worker \
    WORKER_ADMIN_SOCKET=/run/comfy-worker/admin.sock
WORKDIR /var/lib/comfy-worker
EXPOSE 3000
# SIGTERM makes the daemon drain, then stop each child (TERM, then KILL); that takes up to
# `stop_budget` (82 s with the default settings): give the runtime as long, e.g.
# `docker run --stop-timeout 90` / `podman run --stop-timeout 90` (their default is 10 s).
STOPSIGNAL SIGTERM
# Liveness, not readiness: the daemon's event loop answers /health/live on the public port
# (starting, benchmarking and unhealthy workers are alive; a wedged one is not).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/opt/comfy-worker/venv/bin/python", "/opt/comfy-worker/live.py"]
# tini is PID 1: it forwards SIGTERM to the daemon, reaps orphaned grandchildren, and exits
# with the daemon's exit code.
ENTRYPOINT ["/usr/bin/tini", "--", "comfy-worker"]
CMD ["run"]

# --- with-comfyui: ComfyUI from ./ComfyUI, with its own venv over the base's PyTorch ----------
# For a base with CUDA and PyTorch but no ComfyUI. Its requirements come from
# ./wheelhouse/comfyui; the base's own packages (torch) are seen through
# --system-site-packages, so they are not installed twice.
FROM build AS comfyui-build
ARG PYTHON=python3
ARG COMFYUI_DIGEST=
RUN : "${COMFYUI_DIGEST}"
COPY ComfyUI/ /opt/ComfyUI/
RUN ${PYTHON} -m venv --system-site-packages /opt/ComfyUI/venv \
 && if [ -s /opt/ComfyUI/requirements.txt ]; then \
      /opt/ComfyUI/venv/bin/pip install --no-index --find-links /wheels/comfyui \
        --find-links /wheels --no-cache-dir -q -r /opt/ComfyUI/requirements.txt; fi \
 && mkdir -p /opt/ComfyUI/output

FROM common AS with-comfyui
ARG COMFYUI_DIGEST=
RUN : "${COMFYUI_DIGEST}"
COPY --from=comfyui-build --chown=10001:10001 /opt/ComfyUI/ /opt/ComfyUI/
USER 10001:10001
VOLUME ["/var/lib/comfy-worker", "/var/log/comfy-worker", "/opt/ComfyUI/output"]

# --- the default image: comfy-worker over a base that brings ComfyUI -------------------------
FROM common AS comfy-worker
USER 10001:10001
VOLUME ["/var/lib/comfy-worker", "/var/log/comfy-worker", "/opt/ComfyUI/output"]
