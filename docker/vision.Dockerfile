# The vision worker: loads only visual.* weights; Triton kernels on the GPU.
# The tested stack, from constraints.txt (the one list of versions): Python 3.11, torch's CUDA wheel from
# PyPI (the CUDA and cuDNN libraries come with it as nvidia-* wheels; the host gives the driver), Triton,
# transformers and the rest at the versions the tests and the GPU benchmarks ran.
# tests/deploy/test_versions.py checks what this file installs, runs and probes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Triton compiles a small C launcher (against Python.h, which this image has) when a kernel first runs
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    SPLITVL_HOST=0.0.0.0 \
    SPLITVL_PORT=8000 \
    SPLITVL_USE_KERNELS=true

RUN useradd --create-home --uid 10001 splitvl && mkdir -p /cache/huggingface /models && chown -R splitvl /cache /models
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY service ./service
COPY kernels ./kernels
COPY clients ./clients
# constraints.txt's torch line is the CPU build the tests run; the image takes its "# cuda:" line instead
RUN sed -e '/^torch==/d' -e 's/^# cuda: //' constraints.txt > /tmp/constraints-cuda.txt \
 && pip install -c /tmp/constraints-cuda.txt ".[kernels]" \
 && rm /tmp/constraints-cuda.txt

USER splitvl
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"SPLITVL_PORT\",\"8000\")}/healthz', timeout=2)"
CMD ["splitvl", "serve", "vision"]
