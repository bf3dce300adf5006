# nextchar trainer: CPU torch + the trainer and exporter; runs once, writing models to /models.
#
# BASE: a Debian-based image with python3 3.11 (the CPU torch wheel's ABI) and its venv module.
# torch 2.13.0 on PyPI is the CUDA build (GBs). Where the CPU build comes from (docs/deploy.md):
#   TORCH_INDEX_URL   an index that serves it (https://download.pytorch.org/whl/cpu), or
#   TORCH_FIND_LINKS  a page that links the wheel, e.g. a local wheel directory served on 127.0.0.1
#                     (scripts/deploy/stage-wheels.sh; builds on the host network reach it).
# The wheel never travels in the build context, which is the sources only (.dockerignore).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Build stages carry this label so that `podman image prune --filter label=...` finds them afterwards.
LABEL io.nextchar.stage=build
ARG TORCH_INDEX_URL=""
ARG TORCH_FIND_LINKS=""
WORKDIR /src
# torch first, in its own layer (the same pin as pyproject's [train] extra): a source edit then rebuilds
# only the small layers below. A torch-2.13.0+cpu wheel wins over PyPI's 2.13.0 (a local version sorts
# higher).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0" \
    && /opt/venv/bin/python -c "import torch; assert not torch.cuda.is_available(), torch.__version__"
COPY pyproject.toml setup.py README.md ./
COPY scripts/gen_proto.py scripts/gen_proto.py
COPY proto/ proto/
COPY training/ training/
COPY server/ server/
COPY client/ client/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ".[train]" \
    && /opt/venv/bin/nextchar train --help >/dev/null

FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
COPY scripts/deploy/train-models.sh /usr/local/bin/nextchar-train-models
RUN mkdir -p /models /work && chown 10001:10001 /models /work
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /work
CMD ["nextchar-train-models"]
