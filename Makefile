# cnncli — a newcomer's targets: `make train`, `make test`, `make bench`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Real CIFAR-10: $CNNCLI_DATA, else the shared read-only copy beside this checkout when it exists, else
# nothing (cnn then downloads to ~/.cache/cnncli). Override with `make train DATA=/path/to/data`.
DATA   ?= $(abspath $(or $(CNNCLI_DATA),$(wildcard ../shared/data)))
DATA_OPT = $(if $(DATA),--data-dir $(DATA))
CONFIG ?= configs/seed.yaml

.PHONY: venv test lint train bench bench-torch gradcheck clean

$(BIN)/cnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,viz,images,sweep,tensorboard,onnx]'
	touch $@

venv: $(BIN)/cnn

lint: venv
	$(BIN)/ruff check cnncli tests

test: venv lint
	$(if $(DATA),CNNCLI_DATA=$(DATA)) $(BIN)/python -m pytest -q

train: venv
	$(BIN)/cnn train --config $(CONFIG) $(DATA_OPT)

gradcheck: venv
	$(BIN)/cnn gradcheck --config $(CONFIG)

bench: venv
	$(BIN)/cnn bench --config configs/seed.yaml
	$(BIN)/cnn bench --config configs/seed-diagram.yaml

# Side by side with PyTorch CPU (both memory formats, interleaved rounds, medians). torch is never a dependency
# of cnncli: this target alone installs it into the venv when it is missing.
TORCH_VERSION ?= 2.13.0
bench-torch: venv
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/cnn bench --against torch --config configs/seed.yaml
	$(BIN)/cnn bench --against torch --config configs/seed-diagram.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
