# One command per task, used alike by people, CI and Dockerfiles.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install proto test lint bench demo clean compose-smoke playground test-playground

install: $(STAMP)   ## .venv with nextchar, the trainer (CPU torch) and the test tools

$(STAMP): pyproject.toml setup.py scripts/install.sh
	bash scripts/install.sh
	touch $@

proto: $(STAMP)     ## regenerate the Python protobuf/gRPC code from proto/ (never edit it by hand)
	$(PY) scripts/gen_proto.py

test: $(STAMP) proto   ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

lint: $(STAMP) proto   ## ruff, then mypy over server/, client/, training/ (scripts/typecheck.sh)
	$(PY) -m ruff check .
	bash scripts/typecheck.sh

bench: $(STAMP) proto
	$(PY) -m bench.run_all

demo: $(STAMP) proto   ## train the default model on the built-in corpus, export, serve, generate
	bash scripts/demo.sh

compose-smoke: $(STAMP) proto   ## the real deployment with podman (root): build, compose up, scale out, kill a replica
	bash scripts/compose_smoke.sh

SERVER ?= localhost:50051
playground: $(STAMP) proto   ## the browser playground next to a running server: make playground SERVER=host:port
	$(PY) scripts/playground.py --server $(SERVER)

test-playground: $(STAMP) proto   ## the playground in headless chromium against a real server (via Envoy)
	$(PY) -m pytest -q tests/e2e/test_playground.py

clean:
	rm -rf build *.egg-info .pytest_cache runs models
