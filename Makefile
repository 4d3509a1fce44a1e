# lageo: `make demo` runs the whole pipeline on the embedded demo; `make test` runs lint and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo lab bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,peers,engines]'
	# the kernel the notebooks name, so `papermill notebooks/03_finetune.ipynb out.ipynb` finds it
	$(BIN)/python -m ipykernel install --sys-prefix --name lageo --display-name "lageo (.venv)"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .

# Test files run on two workers (pytest-xdist, a file per worker, so module fixtures are built once): most tests
# wait on one core (kernels, subprocesses), and the suite's slow files then overlap.
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

demo: setup
	$(BIN)/lageo run --profile demo

# JupyterLab on the notebooks with the kernel they name (`lageo`, this .venv's Python), so it opens
# without asking for a kernel; jupyter-config/ holds its default settings (no news pop-up).
lab: setup
	$(BIN)/python -m pip install --quiet -e '.[test,lab]'
	JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter-config$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  $(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: setup
	$(BIN)/lageo bench embed --model ViT-B-32 --pretrained none --images 256
	$(BIN)/lageo bench engine --model ViT-B-32 --pretrained none --batch-size 32 --rounds 7
	$(BIN)/lageo bench train --model ViT-B-32 --pretrained none --strategy linear_probe --embeddings 6000 --epochs 8 --rounds 5
	$(BIN)/lageo bench gallery --sizes 10000 100000

clean-venv:
	rm -rf $(VENV)
