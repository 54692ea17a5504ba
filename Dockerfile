# DMJD on GPUs. torch and torchvision come with the base image (a current PyTorch; requirements.txt needs 2.6 or later,
# the first whose weights_only=True loading is safe from crafted files); requirements.txt adds the rest without
# reinstalling them. Another base: --build-arg BASE_IMAGE=<image>.
#   docker build -t dmjd .
#   docker run --gpus all --ipc=host -v /path/to/imagenet:/data -v /path/to/out:/out dmjd \
#       torchrun --nproc_per_node=8 main_pretrain.py --data_path /data --output_dir /out/dmjd_convit_b
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace/dmjd

# Dependencies first: a code change does not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && python -c "import torch, torchvision, timm, submitit; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY . .
CMD ["python", "main_pretrain.py", "--help"]
