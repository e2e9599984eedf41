# Training image: installs ctrserve with its training extra (CPU build of torch, pinned by
# requirements/constraints.txt) and runs the end-to-end demo (generate -> train -> evaluate).
# The serving image, GPU variant and non-root user come with the deployment work.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY ctrserve ./ctrserve
COPY models ./models
COPY export ./export
COPY service ./service
COPY loadtest ./loadtest
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -c requirements/constraints.txt ".[train]"
VOLUME ["/app/runs"]
CMD ["ctrserve", "demo", "--workdir", "/app/runs/demo"]
