# Every target sets itself up: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run pipeline test bench serve clean

# torch==2.13.0 first (the CPU wheel); the project's torch range then admits it and pulls nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the whole recipe on the active profile (params.yaml: tiny by default) with `dvc repro`, then the wall
# time of every stage (from MLflow) and where to look.
run: pipeline

pipeline: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	@$(BIN)/python -m components.tracking
	@echo
	@echo "Done. Metrics: .venv/bin/dvc metrics show    Plots: .venv/bin/dvc plots show (writes dvc_plots/index.html)"
	@echo "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db   (then http://127.0.0.1:5000)"
	@echo "Serve:      make serve   (Ray Serve, OpenAI-compatible, http://127.0.0.1:8000/v1)"
	@echo "Query:      curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "              -d '{\"model\": \"llama2-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 3 + 4?\"}]}'"

# Ray Serve, OpenAI-compatible, on http://127.0.0.1:8000/v1; serves models:/llama2-chat@champion
# (LLAMA2_MODEL_URI=<checkpoint folder or models:/...> to serve something else).
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" serve run infra/serve.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV)
