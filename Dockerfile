# The project with JupyterLab on a CUDA PyTorch image. Build and run (README, "Docker and Jupyter"):
#
#   docker build -t nuclei-unet .
#   docker run --rm -it --gpus all --shm-size=8g -p 8888:8888 --user "$(id -u):$(id -g)" \
#       -v "$PWD":/workspace/repo -v /path/to/data:/workspace/repo/data nuclei-unet
#
# NOT BUILT where it was written: that machine had a Docker client but no engine (and no access to
# Docker Hub), so neither this file nor the base image tag below has been tried there.
#
# Base: the official pytorch/pytorch image whose torch is the one requirements.txt pins (2.14.1,
# the CUDA 13.0 build that this repository's environment uses: torch.__version__ 2.14.1+cu130),
# following that image's <torch>-cuda<X.Y>-cudnn<N>-runtime tag pattern. It brings the CUDA and
# cuDNN runtime libraries, Python, and torch and torchvision installed with pip, so the
# `pip install -r requirements.txt` below finds torch==2.14.1 and torchvision==0.29.1 satisfied
# (a local version label such as +cu130 matches a pin without one) and installs the rest. If that
# tag does not exist, pass another with --build-arg BASE=..., e.g. an nvidia/cuda:<X.Y>-cudnn-runtime
# image with Python 3.10 or newer: pip then installs torch from requirements.txt too.
ARG BASE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# the pinned requirements first, so that editing the code does not reinstall them; JupyterLab and
# ipywidgets (tqdm's progress bars in notebooks), pinned as well, are for the container only
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m pip install -r /tmp/requirements.txt jupyterlab==4.6.6 ipywidgets==8.1.9 \
    && python3 -c "import torch, torchvision, cv2, skimage, onnx, jupyterlab; print('torch', torch.__version__)"

# Any user id (docker run --user "$(id -u):$(id -g)", so outputs in the mounted repository belong
# to the user) has no entry in /etc/passwd and no home: give every user one writable home for
# Jupyter's, IPython's, matplotlib's and torch's files, and writable code and cache folders.
ENV HOME=/home/user \
    MPLCONFIGDIR=/home/user/.config/matplotlib \
    TORCH_HOME=/home/user/.cache/torch
RUN mkdir -p /home/user /workspace/repo && chmod 1777 /home/user /workspace /workspace/repo

# The code, for running the image without a mount; `-v "$PWD":/workspace/repo` puts the working
# copy (and its outputs) in its place. .dockerignore keeps data, outputs and environments out.
COPY . /workspace/repo
RUN chmod -R a+rwX /workspace/repo
WORKDIR /workspace/repo

EXPOSE 8888
# JupyterLab on all interfaces inside the container (reach it through -p 8888:8888), with its usual
# login token printed in the log; `docker run ... nuclei-unet python3 train.py ...` runs a script instead
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/workspace/repo"]
