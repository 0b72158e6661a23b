# The two set-up commands of the README: `make demo` and `make test`. Each creates the
# virtual environment when it is missing (CPU torch pinned through constraints-cpu.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint clean

$(BIN)/edgesafe: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $@

demo: $(BIN)/edgesafe
	$(BIN)/edgesafe compress --recipe recipes/tiny-shapes.yaml --resume

test: $(BIN)/edgesafe
	$(BIN)/ruff check edgesafe tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
