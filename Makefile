# The two set-up commands of the README: `make demo` and `make test`. Each creates the
# virtual environment when it is missing (CPU torch pinned through constraints-cpu.txt); `make test`
# also installs Debian's headless Chromium when it is missing (the HTML report's test opens it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint clean

$(BIN)/edgesafe: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium > /dev/null

demo: $(BIN)/edgesafe
	$(BIN)/edgesafe compress --recipe recipes/tiny-shapes.yaml --resume

test: $(BIN)/edgesafe $(CHROMIUM)
	$(BIN)/ruff check edgesafe tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
