# Every target sets itself up: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run pipeline profile profiles plan test bench serve serve-llm clean

# torch==2.13.0 first (the CPU wheel pip is configured to find); the project's torch range then admits it and pulls
# nothing more. The rest goes through uv (the whole install: ~70 s here, ~150 s with pip alone),
# given the extra indexes pip is configured with (uv does not read pip's configuration), merged as pip merges them,
# and compiling bytecode as pip does (without it, under PYTHONDONTWRITEBYTECODE, every stage and Ray worker compiled
# its imports again: stages took twice as long); if uv fails, pip installs it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv
	$(BIN)/pip install --quiet torch==2.13.0
	extra="$${PIP_EXTRA_INDEX_URL:-$$($(BIN)/pip config get global.extra-index-url 2>/dev/null)}"; \
	  UV_INDEX_STRATEGY=unsafe-best-match UV_EXTRA_INDEX_URL="$$extra" \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]' \
	  || $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the whole recipe on the active profile (params.yaml: tiny by default) with `dvc repro` (flows.repro:
# one local Ray cluster for all stages), then the wall time of every stage (from MLflow) and where to look.
run: pipeline

pipeline: install
	$(BIN)/python -m flows.repro
	@$(BIN)/python -m components.track.tracking
	@echo
	@echo "Done. Metrics: .venv/bin/dvc metrics show    Plots: .venv/bin/dvc plots show (writes dvc_plots/index.html)"
	@echo "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db   (then the page above)"
	@echo "Serve:      make serve   (Ray Serve, OpenAI-compatible, http://127.0.0.1:8000/v1)"
	@echo "Query:      curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "              -d '{\"model\": \"llama2-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 3 + 4?\"}]}'"

# Profiles (infra/profiles/*.yaml): `make profile PROFILE=ci` makes one the active params.yaml (a copy); `make profiles`
# lists them. It refuses to overwrite edits to params.yaml that its profile file lacks (FORCE=1 overwrites them).
PROFILES := $(sort $(basename $(notdir $(wildcard infra/profiles/*.yaml))))
ACTIVE_PROFILE = $(shell sed -n 's/^profile: *\([^ #]*\).*/\1/p' params.yaml 2>/dev/null)

profiles:
	@echo "profiles (infra/profiles/): $(PROFILES)"
	@echo "active (params.yaml):       $(ACTIVE_PROFILE)"

profile:
	@if [ -z "$(PROFILE)" ] || [ ! -f "infra/profiles/$(PROFILE).yaml" ]; then \
	  echo "error: $(if $(PROFILE),no profile '$(PROFILE)',PROFILE is not set); available: $(PROFILES)" \
	    "(make profile PROFILE=<name>)" >&2; \
	  exit 2; fi
	@if [ -f params.yaml ] && [ -z "$(FORCE)" ] && ! cmp -s params.yaml "infra/profiles/$(ACTIVE_PROFILE).yaml"; then \
	  echo "error: params.yaml differs from infra/profiles/$(ACTIVE_PROFILE).yaml (edited, or an unknown profile);" \
	    "save it there first, or overwrite it with FORCE=1" >&2; \
	  exit 2; fi
	cp "infra/profiles/$(PROFILE).yaml" params.yaml
	@echo "params.yaml is now the $(PROFILE) profile: make pipeline (or dvc repro) runs it"

# Per-GPU memory of every stage (python -m flows.plan): PROFILE=<name> reads infra/profiles/<name>.yaml, else the
# active params.yaml; exits 1 naming the stages that do not fit (GPU_GB=80 by default).
GPU_GB ?= 80
plan: install
	@$(BIN)/python -m flows.plan $(if $(PROFILE),"infra/profiles/$(PROFILE).yaml",params.yaml) --gpu-memory-gb $(GPU_GB)

# Ray Serve, OpenAI-compatible, on http://127.0.0.1:8000/v1; serves models:/llama2-chat@champion
# (LLAMA2_MODEL_URI=<checkpoint folder or models:/...> to serve something else).
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" serve run infra/serve.yaml

# The GPU engine (infra/serve_llm.yaml): Ray Serve LLM + vLLM serving the champion's HF export with the profile's
# serve_llm section (replicas, GPUs per replica, context), same URL. vLLM is an optional extra (CUDA torch): on a GPU
# node, `.venv/bin/pip install -e '.[vllm]'` first; without it this target says so and stops.
serve-llm:
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" 2>/dev/null || { \
	  echo "error: vLLM is not installed in $(VENV): on a GPU node, make install && $(BIN)/pip install -e '.[vllm]'" \
	    "(it brings CUDA torch; for the CPU profiles use make serve)" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" serve run infra/serve_llm.yaml

test: install
	$(BIN)/python -m pytest -q --durations=5

bench: install
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV)
