# One image for the sidecar and the operator; the entrypoint is the `convostore` command
# (`convostore sidecar ...`, `convostore operator run ...`).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY sidecar ./sidecar
COPY operator ./operator
RUN python -m venv /opt/convostore \
    && /opt/convostore/bin/pip install --no-cache-dir --upgrade pip==24.3.1 \
    && /opt/convostore/bin/pip install --no-cache-dir '.[sidecar,operator]'

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="convostore" \
      org.opencontainers.image.description="Conversation memory for AI agents: sidecar and operator"
RUN groupadd --gid 65532 convostore \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin convostore \
    && mkdir -p /var/lib/convostore /var/run/convostore \
    && chown 65532:65532 /var/lib/convostore /var/run/convostore
COPY --from=build /opt/convostore /opt/convostore
ENV PATH=/opt/convostore/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /var/lib/convostore
EXPOSE 8790
HEALTHCHECK --interval=30s --timeout=5s CMD ["convostore", "probe", "--url", "http://127.0.0.1:8790"]
ENTRYPOINT ["convostore"]
CMD ["sidecar"]
