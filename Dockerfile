# Two images from one file, each with the `convostore` command as its entrypoint:
#   --target sidecar   the sidecar alone (`convostore sidecar ...`), what every agent pod
#                      runs: its dependencies only, no Kubernetes client or operator code
#   --target operator  the operator (`convostore operator run ...`), the default target
# BASE is any Debian bookworm image with Python 3.11 as `python` and its venv module: the
# official image by default; scripts/build-images.sh --base local builds one from Debian's
# packages for hosts that reach no registry (the tests build on it).
ARG BASE=python:3.11.11-slim-bookworm

FROM ${BASE} AS build-sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY sidecar ./sidecar
COPY operator ./operator
COPY cli ./cli
# pip lives in a venv of its own and installs into /opt/convostore, which has none: the
# images carry neither pip nor setuptools. Wheels that ship their C and Cython sources
# (asyncmy: 14 MB) lose them; only the compiled modules run.
ENV PIP_NO_CACHE_DIR=1
RUN python -m venv --without-pip /opt/convostore \
    && python -m venv /opt/pip \
    && /opt/pip/bin/pip install --upgrade pip==24.3.1 \
    && /opt/pip/bin/pip --python /opt/convostore/bin/python install '.[sidecar,sidecar-tracing]' \
    && find /opt/convostore -type f \( -name '*.c' -o -name '*.pyx' -o -name '*.pxd' \) -delete

FROM build-sidecar AS build-operator
RUN /opt/pip/bin/pip --python /opt/convostore/bin/python install '.[sidecar,sidecar-tracing,operator]'

FROM ${BASE} AS runtime
RUN groupadd --gid 65532 convostore \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin convostore \
    && mkdir -p /var/lib/convostore /var/run/convostore \
    && chown 65532:65532 /var/lib/convostore /var/run/convostore
ENV PATH=/opt/convostore/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/convostore
ENTRYPOINT ["convostore"]

FROM runtime AS sidecar
LABEL org.opencontainers.image.title="convostore-sidecar" \
      org.opencontainers.image.description="Conversation memory for AI agents: the sidecar"
COPY --from=build-sidecar /opt/convostore /opt/convostore
USER 65532:65532
EXPOSE 8790 8791
# No HEALTHCHECK: the kubelet ignores it (the operator injects HTTP probes on the health
# port), and where the sidecar listens depends on its args (an injected one serves no TCP)
CMD ["sidecar"]

FROM runtime AS operator
LABEL org.opencontainers.image.title="convostore" \
      org.opencontainers.image.description="Conversation memory for AI agents: the operator"
COPY --from=build-operator /opt/convostore /opt/convostore
USER 65532:65532
CMD ["operator", "run"]
