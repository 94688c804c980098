# One image for all five services; docker-compose.yml picks the module per service.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir "torch==2.13.0" && pip install --no-cache-dir -e . \
    && apex-serve make-model --preset default --out /models/apex-tiny-llama
ENV APEX_LOG_LEVEL=INFO
