# syntax=docker/dockerfile:1
# One CUDA image for the Ray head, the Ray GPU workers, the RayJob submitter and the MLflow server.
#
# Build:  docker build -t REGISTRY/capt:TAG .          (e.g. ghcr.io/your-org/capt:0.1.0)
# Push:   docker push REGISTRY/capt:TAG
# Use:    set images[name=capt] newName/newTag in k8s/settings/kustomization.yaml, then see k8s/README.md.
#
# Base: the official Ray GPU image (ray-ml images are no longer published), Python 3.11 to match
# requirements.lock. Its `ray` user (uid 1000, gid 100) runs everything; nothing runs as root.
# torch comes from requirements.lock (torch 2.14.1, CUDA 13 wheels with their own CUDA libraries): GPU nodes
# need an NVIDIA driver that supports CUDA 13 (>= 580).
# No credentials are baked in: they arrive at run time from Kubernetes Secrets.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

LABEL org.opencontainers.image.title="capt-pipeline" \
      org.opencontainers.image.description="Adversarial prompt tuning of CLIP (CAPT) with a Ray Tune + Optuna + MLflow search" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/rayproject/ray:2.60.0-py311-gpu"

# Mount points: /models for the weights cache volume, /mnt/shared for Ray Tune's shared storage.
USER root
RUN mkdir -p /models /mnt/shared /home/ray/app \
 && chown 1000:100 /models /mnt/shared /home/ray/app
USER 1000:100
WORKDIR /home/ray/app

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    OPENCLIP_CACHE_DIR=/models \
    HF_HOME=/models

# 1) Dependencies, in their own layer so that code changes rebuild in seconds: install the project against
#    the lock (as pip constraints) from a stub package, then drop the stub.
#    The PostgreSQL driver (psycopg 3, URIs postgresql+psycopg://) and MLflow's basic-auth app (mlflow[auth])
#    come with the project's dependencies (requirements.lock); boto3: MLflow's S3 client.
#    torchattacks 3.5.1 pins requests~=2.25 (conflicts with ray/mlflow): installed without its pins; what it
#    really needs (torch, torchvision, scipy, tqdm) is already there.
COPY --chown=1000:100 pyproject.toml requirements.lock README.md ./
RUN mkdir -p pipeline && touch pipeline/__init__.py \
 && pip install --no-cache-dir -c requirements.lock . boto3==1.44.5 \
 && pip install --no-cache-dir --no-deps torchattacks==3.5.1 \
 && pip uninstall -y capt-pipeline \
 && rm -rf pipeline build ./*.egg-info

# 2) The project itself. The sources stay in /home/ray/app too: the RayJob entrypoint runs
#    `python pipeline/search.py --config search_spaces/<name>.yaml` from this directory.
COPY --chown=1000:100 pipeline/ pipeline/
COPY --chown=1000:100 search_spaces/ search_spaces/
COPY --chown=1000:100 configs/ configs/
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info \
 && python -c "import pipeline, ray, torch, open_clip, torchattacks, optuna, mlflow, psycopg, flask_wtf, boto3"

# No HEALTHCHECK: KubeRay probes the Ray processes itself; the MLflow Deployment has HTTP probes.
# No CMD: KubeRay and k8s/mlflow.yaml set the command.
