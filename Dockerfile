# The image `cog build` makes from cog.yaml, for machines with Docker but without the cog CLI:
#   docker build -t faster-diffusion .
#   docker run --gpus all -p 5000:5000 faster-diffusion
#   curl -s localhost:5000/predictions -H 'Content-Type: application/json' \
#        -d '{"input": {"prompt": "a photo of an astronaut riding a horse"}}'
# Weights: run script/download-weights before building to bake in Stable Diffusion v1.5
# (weights/stable-diffusion-v1-5), or pass -e COG_WEIGHTS=<dir or URL of a tar> at run
# time; otherwise the server loads the bundled toy model weights/tiny-shapes.
# torch 2.13.0 from PyPI is built for CUDA 13 and brings its own CUDA libraries (cuDNN too):
# the host needs an NVIDIA driver >= 580 and the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3.12 is what the image is tested with; its exact build follows the base tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /src
COPY requirements.txt /src/requirements.txt
RUN pip install -r requirements.txt "cog==0.23.1"

COPY .cog /src/.cog
COPY faster_diffusion /src/faster_diffusion
COPY service /src/service
COPY predict.py cog.yaml /src/
COPY weights /src/weights

ENV COG_PREDICT_TYPE_STUB=predict.py:Predictor
EXPOSE 5000
# coglet behind a guard that refuses prediction ids coglet 0.23.1 cannot handle and restarts it if it
# wedges (service/serve.py, docs/service.md), and gives its worker the memory bounds of service/memory.py
# (docs/operations.md); `make serve` runs the same.
CMD ["python", "-m", "service.serve"]
