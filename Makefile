# cnncli — a newcomer's targets: `make train`, `make test`, `make bench`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Real CIFAR-10: the shared read-only copy here; override with `make train DATA=...`.
DATA   ?= $(or $(CNNCLI_DATA),../shared/data)
CONFIG ?= configs/seed.yaml

.PHONY: venv test lint train bench gradcheck clean

$(BIN)/cnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,viz]'
	touch $@

venv: $(BIN)/cnn

lint: venv
	$(BIN)/ruff check cnncli tests

test: venv lint
	CNNCLI_DATA=$(DATA) $(BIN)/python -m pytest -q

train: venv
	$(BIN)/cnn train --config $(CONFIG) --data-dir $(DATA)

gradcheck: venv
	$(BIN)/cnn gradcheck --config $(CONFIG)

bench: venv
	$(BIN)/cnn bench --config configs/seed.yaml
	$(BIN)/cnn bench --config configs/seed-diagram.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
