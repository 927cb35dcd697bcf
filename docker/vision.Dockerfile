# The vision worker: loads only visual.* weights; Triton kernels on the GPU.
# CUDA PyTorch base: torch, CUDA and cuDNN come from the base image, never from pip.
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    SPLITVL_HOST=0.0.0.0 \
    SPLITVL_PORT=8000 \
    SPLITVL_USE_KERNELS=true

RUN useradd --create-home --uid 10001 splitvl && mkdir -p /cache/huggingface /models && chown -R splitvl /cache /models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY kernels ./kernels
COPY clients ./clients
# torch is already in the base image and satisfies the requirement, so pip keeps it
RUN pip install ".[kernels]"

USER splitvl
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"SPLITVL_PORT\",\"8000\")}/healthz', timeout=2)"
CMD ["splitvl", "serve", "vision"]
