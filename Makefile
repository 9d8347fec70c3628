PY := .venv/bin/python
PROMPT ?= a red square in the center
# Extra flags for script/generate, e.g. ARGS="--num-inference-steps 20 --seed 7 --acceleration none"
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: setup test generate serve schema

setup:
	bash script/setup

test: setup
	$(PY) -m pytest

# Images from a prompt on whatever weights are present (see docs/service.md); files land in outputs/.
generate: setup
	$(PY) script/generate --prompt "$(PROMPT)" $(ARGS)

# The Cog HTTP API (coglet) on $(HOST):$(PORT), without Docker. The worker it spawns runs
# `python` from PATH, hence the venv first on PATH.
serve: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) \
		python -m cog.server.http --host $(HOST)

# Regenerate .cog/openapi_schema.json after changing predict.py's inputs.
schema:
	$(PY) script/openapi-schema
