# One image for the API, the workers and Flower (docker-compose.yml picks the command).
#
#   docker build -t genq:cpu .                          # CPU-only torch (~1 GB image)
#   docker build -t genq:cuda --build-arg VARIANT=cuda .  # CUDA torch (~6 GB image)
#
# VARIANT=cuda keeps the python:3.11-slim base and installs PyPI's default Linux torch
# wheel, which carries its own CUDA runtime (the nvidia-* wheels): the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit, not a CUDA base image.
FROM python:3.11-slim

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GENQ_HOME=/var/lib/genq

RUN case "$VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p common worker api migrations \
    && touch common/__init__.py worker/__init__.py api/__init__.py migrations/__init__.py \
    && pip install '.[s3]' \
    && pip uninstall -y genq \
    && rm -rf common worker api migrations build *.egg-info

COPY common common
COPY worker worker
COPY api api
COPY migrations migrations
RUN pip install --no-deps '.[s3]' && rm -rf build *.egg-info

# Named volumes mounted on these folders start with this ownership.
RUN useradd --create-home --uid 10001 genq \
    && mkdir -p /data /var/lib/genq \
    && chown genq:genq /data /var/lib/genq

USER genq
ENTRYPOINT ["genq"]
CMD ["--help"]
