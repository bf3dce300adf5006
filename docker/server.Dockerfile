# nextchar gRPC server: onnxruntime + grpcio + numpy, no torch; unprivileged, with a gRPC HEALTHCHECK.
#
# BASE: a Debian-based image with python3 (>= 3.11) and its venv module. The default is the official
# slim image; scripts/podman-setup.sh builds a debootstrap one where no registry image can be pulled.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Build stages carry this label so that `podman image prune --filter label=...` finds them afterwards.
LABEL io.nextchar.stage=build
WORKDIR /src
# Only what the package build reads, so edits to tests or docs do not rebuild the image.
COPY pyproject.toml setup.py README.md ./
COPY scripts/gen_proto.py scripts/gen_proto.py
COPY proto/ proto/
COPY training/ training/
COPY server/ server/
COPY client/ client/
# `pip install .` without extras: the server's dependencies only (the build hook generates the proto code).
# pip and setuptools are not needed at run time (25 MB).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/venv/bin/nextchar --help >/dev/null \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
# /models belongs to the server's user so a fresh named volume mounted there is readable and owned alike.
RUN mkdir -p /models && chown 10001:10001 /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NEXTCHAR_MODEL_REPO=/models \
    NEXTCHAR_PORT=50051
USER 10001:10001
EXPOSE 50051
# Healthy means the gRPC health service answers SERVING (models validated and warmed up), asked through
# nextchar's own client; through sh so that it follows NEXTCHAR_PORT.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "exec nextchar health --server 127.0.0.1:${NEXTCHAR_PORT}"]
ENTRYPOINT ["nextchar"]
CMD ["serve"]
