PY := .venv/bin/python
PROMPT ?= a red square in the center
# Extra flags for script/generate, e.g. ARGS="--num-inference-steps 20 --seed 7 --acceleration none"
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: setup test generate serve schema reference-model lora

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

# Retrain the bundled model from scratch on the CPU (three stages, ~57 min on 2 cores) into
# build/tiny-shapes; weights/tiny-shapes/README.md says what each stage does.
reference-model: setup
	$(PY) script/train-reference --out build/reference/vae --minutes 9.5 --vae-fraction 0.9 --steps 1 --seed 5
	$(PY) script/train-reference --vae-from build/reference/vae --out build/reference/layout --minutes 12 --batch 128 \
		--high-t-frac 0.3 --high-t-min 600 --pure-noise-frac 0.5 --pure-noise-min-t 900 --x0-weight-max 20 --seed 6
	$(PY) script/train-reference --init-from build/reference/layout --out build/tiny-shapes --minutes 36 --batch 128 --lr 5e-4 \
		--high-t-frac 0.3 --high-t-min 600 --pure-noise-frac 0.5 --pure-noise-min-t 900 --x0-weight-max 5 --seed 7 --check 180

# Retrain weights/tiny-shapes-orange-lora (the colour "orange" for the bundled model, ~7 min on 1 CPU thread)
# and measure its adherence on 30 captions; its README.md says what it does.
lora: setup
	OMP_NUM_THREADS=1 $(PY) script/train-lora --minutes 7 --check 30
