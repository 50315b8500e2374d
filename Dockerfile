FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orderedstream ./orderedstream
RUN pip install --no-cache-dir ".[hiredis,prometheus]"
ENTRYPOINT ["orderedstream"]
