# syntax=docker/dockerfile:1.7
# One image for every Python service (web, worker, convert-worker; `qwen-deploy doctor` too).
#
#   docker build -t qwen-deploy:cpu .                                  # CPU torch (default)
#   docker build -t qwen-deploy:cuda --build-arg TORCH_VARIANT=cuda .  # CUDA torch, exactly as locked
#
# Every package comes from uv.lock (`uv sync --frozen --no-dev`). TORCH_VARIANT=cpu leaves out torch
# and its CUDA-only wheels (nvidia-*, cuda-*, triton: several GB) and installs the same torch version
# from the PyTorch CPU wheel index (TORCH_CPU_INDEX) instead. TORCH_VARIANT=cuda keeps the lock's
# PyPI torch, which is the CUDA build on Linux.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG UV_VERSION=0.13.8
ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /app

# Dependencies first (a layer that changes only with the lock), then the project itself.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv <<'EOF'
set -eu
case "$TORCH_VARIANT" in
  cpu|cuda) ;;
  *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 2 ;;
esac
: > /app/.uv-skip
if [ "$TORCH_VARIANT" = cpu ]; then
  python3 -c 'import tomllib; pk = tomllib.load(open("uv.lock", "rb"))["package"]; print(" ".join("--no-install-package " + p["name"] for p in pk if p["name"] == "torch" or p["name"].startswith(("nvidia-", "cuda-", "triton"))))' > /app/.uv-skip
fi
# shellcheck disable=SC2046
uv sync --frozen --no-dev --no-install-project --inexact $(cat /app/.uv-skip)
if [ "$TORCH_VARIANT" = cpu ]; then
  torch_version=$(python3 -c 'import tomllib; print(next(p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"] if p["name"] == "torch"))')
  # torch's other dependencies (sympy, networkx, ...) came from the lock above.
  uv pip install --python /app/.venv/bin/python --no-deps --index-url "$TORCH_CPU_INDEX" "torch==${torch_version}"
fi
EOF

COPY . .
# --inexact keeps the CPU torch installed above (the lock names the PyPI build).
RUN --mount=type=cache,target=/root/.cache/uv <<'EOF'
set -eu
# shellcheck disable=SC2046
uv sync --frozen --no-dev --inexact $(cat /app/.uv-skip)
/app/.venv/bin/python -c 'import torch, qwen_deploy.cli, tasks, web; print("torch", torch.__version__, "cuda build:", torch.version.cuda)'
EOF
# The CPU kernels (worker/cpu_kernels.py) compiled here, so the runtime image needs no C compiler.
RUN <<'EOF'
set -eu
apt-get update -qq
apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
/app/.venv/bin/python -m worker.cpu_kernels /app/worker/_kernels
EOF


FROM python:${PYTHON_VERSION}-slim AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="qwen-deploy" \
      org.opencontainers.image.description="Celery/Redis job queue serving Hugging Face causal LMs" \
      io.qwen-deploy.torch-variant="${TORCH_VARIANT}"
# The model caches live under /cache: mount a volume there (docker-compose.yml does).
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    QWEN_DEPLOY_CACHE=/cache/qwen-deploy
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /cache/huggingface /cache/qwen-deploy \
 && chown -R app:app /cache
# The code and the virtual environment stay owned by root: the service cannot rewrite itself.
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
CMD ["qwen-deploy", "web", "--host", "0.0.0.0", "--port", "8000"]
