# The adaptwin image: the CLI and every part; services differ only by command (docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY adaptwin adaptwin
COPY ingest ingest
COPY twin twin
COPY replay replay
COPY learner learner
COPY dashboard dashboard
COPY profiler profiler
RUN pip install --no-cache-dir -c constraints.txt . && useradd --create-home adaptwin \
    && mkdir -p /lake /data/learner && chown adaptwin /lake /data/learner
# a named volume mounted on /lake or /data/learner starts with these owners, so the non-root user can write
USER adaptwin
ENV ADAPTWIN_LAKE=/lake
ENTRYPOINT ["adaptwin"]
CMD ["--help"]
