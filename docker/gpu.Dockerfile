# GPU image: every node of cluster/ray-cluster.yaml and cluster/kuberay/ runs in it, and the cluster files
# install nothing at run time, so all a node needs is here.
#   docker build -f docker/gpu.Dockerfile -t registry.example.com/qsae:gpu .
#   docker push registry.example.com/qsae:gpu     # then put that name in the cluster files
# Hosts need an NVIDIA driver for CUDA 13.0 (R580 or newer) and the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# python3-dev, build-essential: Triton (behind vLLM's kernels) compiles a small C launcher at run time.
# rsync, openssh-client: the Ray cluster launcher syncs files into the container and reaches the
# workers over SSH from the head. wget: KubeRay's default health probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git rsync openssh-client wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04's python refuses system-wide pip installs, so everything goes into one venv. Login shells
# (the cluster launcher runs its commands with `bash --login`) get it through /etc/profile.d as well.
RUN python3 -m venv /opt/venv && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/qsae-venv.sh
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

# vLLM pins the CUDA build of torch it was compiled against (vllm 0.33.0: torch 2.14.0, CUDA 13.0), so it
# is installed first and chooses torch. Ray is pinned to the version in cluster/kuberay/ (rayVersion):
# the job client, the head and the workers must all run the same Ray. boto3: the head's autoscaler on AWS.
RUN pip install --upgrade pip \
    && pip install vllm==0.33.0 "ray[default,data,train]==2.60.0" boto3

# The fast Gated-DeltaNet kernels transformers picks up for Qwen3.5 (rollouts, capture and the fidelity
# pass on the transformers path; without them it runs reference loops). causal-conv1d builds against
# the torch above and this image's nvcc, hence no build isolation.
RUN pip install flash-linear-attention \
    && pip install --no-build-isolation causal-conv1d

# qsae from this repository, editable, so the code in /qsae (jobs/, configs/) is what runs; a job
# submitted with --working-dir ships its own copy, which Ray puts ahead of this one on PYTHONPATH.
WORKDIR /qsae
COPY pyproject.toml README.md ./
COPY qsae ./qsae
RUN pip install -e .
COPY . .
