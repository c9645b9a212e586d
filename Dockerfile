# unmask server image. GPU (CUDA PyTorch base) by default:
#   docker build -t unmask .
#   docker run --gpus all -p 8000:8000 -v /data/LLaDA-8B-Instruct:/models/m unmask --model /models/m
# CPU image (CPU torch wheel; the bundled model is the default):
#   docker build --build-arg DEVICE=cpu --build-arg BASE_IMAGE=python:3.11-slim -t unmask:cpu .
#   docker run -p 8000:8000 unmask:cpu
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# cuda: keep the base image's CUDA torch. cpu: install torch==TORCH_VERSION's CPU build, from wheels put in
# benchmarks/docker/wheels/ first (offline builds), else from TORCH_INDEX_URL (PyTorch's CPU index; empty to skip it).
ARG DEVICE=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV UNMASK_DEVICE=${DEVICE} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/unmask/.cache/huggingface

# A venv that sees the base image's packages (the CUDA image's torch) without touching the system Python.
# A CA bundle put in benchmarks/docker/certs/ca-bundle.crt (a TLS-intercepting proxy's) is used by pip during the build
# only: the venv's pip.conf naming it is removed at the end.
COPY benchmarks/docker/certs/ /tmp/certs/
RUN python3 -m venv --system-site-packages /opt/venv \
 && if [ -s /tmp/certs/ca-bundle.crt ]; then \
      cp /tmp/certs/ca-bundle.crt /opt/venv/build-ca.crt \
      && printf '[global]\ncert = /opt/venv/build-ca.crt\n' > /opt/venv/pip.conf; \
    fi \
 && rm -rf /tmp/certs

COPY benchmarks/docker/wheels/ /tmp/wheels/
RUN set -eu; \
    case "$DEVICE" in \
      cpu) pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
               "torch==${TORCH_VERSION}"; \
           python -c "import torch; assert torch.version.cuda is None, torch.__version__; print('torch', torch.__version__)";; \
      cuda) python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";; \
      *) echo "DEVICE must be cuda or cpu, got $DEVICE" >&2; exit 1;; \
    esac; \
    rm -rf /tmp/wheels

# Dependencies first (their layer survives source changes), then the package itself.
WORKDIR /opt/unmask
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY README.md ./
COPY engine engine
COPY kernels kernels
COPY server server
RUN pip install --no-deps . && python -c "import engine, server" \
 && rm -f /opt/venv/pip.conf /opt/venv/build-ca.crt

# CPU image: the C kernels (MoE experts, bf16 attention; engine/model/cpu_kernel.py) are compiled here, once, into
# UNMASK_CACHE_DIR, and the compiler is removed again: the running image needs none, and its first request does not
# wait for a build. The shared object picks AVX2 / AVX512 / AVX512-BF16 code at run time from the CPU it runs on.
ENV UNMASK_CACHE_DIR=/opt/unmask/cache
RUN if [ "$DEVICE" = cpu ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
      && python -c "from engine.model import cpu_kernel; assert cpu_kernel.available(), 'the C kernels did not build'" \
      && ls -l "$UNMASK_CACHE_DIR"/kernels \
      && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --create-home --uid 1000 unmask && mkdir -p /models && chown unmask /models
USER unmask
WORKDIR /home/unmask
# Mount a real checkpoint here: -v /data/LLaDA-8B-Instruct:/models/m ... --model /models/m
VOLUME ["/models"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# `unmask serve --host 0.0.0.0 --port 8000` on the image's device (`--device` defaults to $UNMASK_DEVICE); arguments
# after the image name are appended (--model /models/m --max-num-seqs 64 ...) and override these.
ENTRYPOINT ["unmask", "serve", "--host", "0.0.0.0", "--port", "8000"]
