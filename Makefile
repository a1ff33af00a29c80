# make install: a virtual environment with every extra, at the versions CI tests (constraints.txt).
# make demo: classify the bundled scans (and refuse a photograph) with the shipped model, offline.
# make test: ruff, then the test suite (set BRAINTUMOR_DATA to the Kaggle data root for the real-data tests).
# make serve: the HTTP service and web page on http://127.0.0.1:8000/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install serve

$(BIN)/braintumor: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $@

install: $(BIN)/braintumor

demo: install
	$(BIN)/braintumor predict examples/scans examples/not-mri/camera.png
	$(BIN)/braintumor explain examples/scans --out demo-output/heatmaps
	@echo "heat maps written to demo-output/heatmaps/"

test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/braintumor serve
