# The tf_retrieval application: CLI, index bundles and the search page (web + index + CLI).
# Embedding runs in process by default, or in TF Serving (see docker-compose.yml: `tfr web --server serving:8500`).
#
#   docker build -t tf_retrieval .
#   mkdir -p artifacts   # yours, so that the container (run as you) writes its caches, runs and indexes there
#   docker run --rm --user "$(id -u):$(id -g)" -p 8080:8080 -v $PWD/artifacts:/data -v $TFDS_DATA_DIR:/tfds:ro \
#       tf_retrieval demo --host 0.0.0.0
FROM python:3.11-slim-bookworm AS wheel
# The wheel users install (tf_retrieval with tf_retrieval.web/.serving/.tuning; tests/test_packaging.py checks it).
WORKDIR /src
COPY setup.py setup.cfg README.md ./
COPY tf_retrieval tf_retrieval
COPY serving serving
COPY web web
COPY tuning tuning
RUN pip wheel --no-deps -w /dist .

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TFR_WORKDIR=/data TFDS_DATA_DIR=/tfds KERAS_HOME=/data/keras

RUN useradd --create-home --uid 1000 app && mkdir -p /data /tfds && chown app /data
WORKDIR /app

# Dependencies first (pinned by constraints.txt, read from setup.py over empty packages), so code changes do not
# reinstall them.
COPY setup.py constraints.txt README.md ./
RUN mkdir -p tf_retrieval serving web tuning && touch tf_retrieval/__init__.py serving/__init__.py web/__init__.py \
        tuning/__init__.py \
    && pip install -c constraints.txt ".[scann,serving,web,plots,tuning,litert]" \
    && pip uninstall -y tf_retrieval && rm -rf /app/*
# Then exactly the wheel built above.
COPY --from=wheel /dist /dist
RUN pip install --no-deps /dist/tf_retrieval-*.whl && rm -rf /dist && tfr --help > /dev/null

USER app
EXPOSE 8080
# The demo opens its port at once but answers only once its models are cached, trained and indexed (minutes on a
# first start).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD python -c \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/health', timeout=4)"
ENTRYPOINT ["tfr"]
CMD ["demo", "--host", "0.0.0.0", "--port", "8080"]
