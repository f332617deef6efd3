# roomsecrets — every command a developer or CI needs. `make help` lists them.
# The first use of any target builds .venv from pyproject.toml; tools go to .tools/bin.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := $(VENV)/bin
TOOLS       := $(CURDIR)/.tools/bin
GRPCURL_VERSION := v1.9.3
GHZ_VERSION     := v0.120.0
DATA_DIR    ?= .data
LISTEN      ?= 127.0.0.1:50051
export PATH := $(TOOLS):$(CURDIR)/$(BIN):$(PATH)

.PHONY: help run test gen check-gen lint bench tools clean

help:
	@echo "make run        start the server on $(LISTEN) with the embedded default (SQLite in $(DATA_DIR))"
	@echo "make test       install everything and run the whole test suite (JS, Go, then Python)"
	@echo "make gen        regenerate every client's stubs from proto/"
	@echo "make check-gen  fail if the committed generated code is stale"
	@echo "make lint       ruff, mypy --strict, buf lint"
	@echo "make bench      GetSecret/SetSecret against a bare grpc.aio echo; then SQLite vs PostgreSQL, 1 vs 2 replicas"

$(VENV)/.installed: pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(TOOLS)/grpcurl:
	GOBIN=$(TOOLS) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(TOOLS)/ghz:
	GOBIN=$(TOOLS) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

tools: $(TOOLS)/grpcurl

run: $(VENV)/.installed
	$(BIN)/roomsecrets serve --data-dir $(DATA_DIR) --listen $(LISTEN)

JS := clients/js

$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: $(VENV)/.installed $(TOOLS)/grpcurl $(JS)/node_modules/.installed
	cd $(JS) && ROOMSECRETS_BIN=$(CURDIR)/$(BIN)/roomsecrets npm test --silent
	cd clients/go && ROOMSECRETS_BIN=$(CURDIR)/$(BIN)/roomsecrets go vet ./... && go test -count=1 ./...
	$(PY) -m pytest -q

gen: $(VENV)/.installed $(JS)/node_modules/.installed
	PYTHON=$(CURDIR)/$(PY) TOOLS=$(TOOLS) tools/gen.sh

check-gen: gen
	@git add -N clients proto >/dev/null 2>&1 || true
	@git diff --exit-code --stat -- clients || { echo "generated code is stale: run 'make gen' and commit"; exit 1; }

lint: $(VENV)/.installed
	$(BIN)/ruff check server tests bench clients/python
	$(BIN)/ruff format --check server tests bench clients/python
	$(BIN)/mypy server/roomsecrets_server clients/python/roomsecrets tests bench
	$(BIN)/buf lint

bench: $(VENV)/.installed $(TOOLS)/ghz
	$(PY) -m bench.run
	$(PY) -m bench.scaleout
	$(PY) -m bench.scenarios

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
