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

# The Cog HTTP API on $(HOST):$(PORT), without Docker: coglet behind service/serve.py's guard
# (the Dockerfile's CMD too). coglet's worker runs `python` from PATH, hence the venv first on PATH.
serve: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) \
		python -m service.serve --host $(HOST)

# Regenerate .cog/openapi_schema.json after changing predict.py's inputs.
schema:
	$(PY) script/openapi-schema

# Retrain the bundled model from scratch on the CPU into build/tiny-shapes, in seven stages (~155 min on
# 2 cores); weights/tiny-shapes/README.md says what each does. A stage is done when its training.json
# exists (written last), so an interrupted `make reference-model` resumes at the stage it was in.
REF := build/reference
reference-model: build/tiny-shapes/training.json

$(REF)/vae/training.json: | setup
	$(PY) script/train-reference --out $(REF)/vae --minutes 9.5 --vae-fraction 0.9 --steps 1 --seed 5

$(REF)/layout/training.json: $(REF)/vae/training.json
	$(PY) script/train-reference --vae-from $(REF)/vae --out $(REF)/layout --minutes 12 --batch 128 \
		--high-t-frac 0.3 --high-t-min 600 --pure-noise-frac 0.5 --pure-noise-min-t 900 --x0-weight-max 20 --seed 6

$(REF)/epsilon/training.json: $(REF)/layout/training.json
	$(PY) script/train-reference --init-from $(REF)/layout --out $(REF)/epsilon --minutes 36 --batch 128 --lr 5e-4 \
		--high-t-frac 0.3 --high-t-min 600 --pure-noise-frac 0.5 --pure-noise-min-t 900 --x0-weight-max 5 --seed 7

V_PRED := --prediction-type v_prediction --zero-terminal-snr --timestep-spacing trailing
$(REF)/v-prediction/training.json: $(REF)/epsilon/training.json
	$(PY) script/train-reference --init-from $(REF)/epsilon --out $(REF)/v-prediction --minutes 32 --batch 128 --lr 5e-4 \
		--high-t-frac 0.3 --high-t-min 600 $(V_PRED) --seed 8 --check 180

$(REF)/low-t/training.json: $(REF)/v-prediction/training.json
	$(PY) script/train-reference --init-from $(REF)/v-prediction --out $(REF)/low-t --minutes 22 --batch 128 --lr 2.5e-4 \
		--caption-dropout 0.2 --low-t-frac 0.3 --low-t-max 300 --high-t-frac 0.15 --high-t-min 600 $(V_PRED) --seed 9 --check 90

LATE := --caption-dropout 0.2 --low-t-frac 0.3 --low-t-max 300 --high-t-frac 0.15 --high-t-min 600 $(V_PRED)
$(REF)/guided/training.json: $(REF)/low-t/training.json
	$(PY) script/train-reference --init-from $(REF)/low-t --out $(REF)/guided --minutes 20 --batch 128 --lr 1.5e-4 \
		$(LATE) --guided-weight 1 --guided-t-max 200 --seed 11 --check 90

build/tiny-shapes/training.json: $(REF)/guided/training.json
	$(PY) script/train-reference --init-from $(REF)/guided --out build/tiny-shapes --minutes 20 --batch 128 --lr 1.5e-4 \
		$(LATE) --guided-weight 3 --guided-t-max 300 --seed 12 --check 90

# Retrain weights/tiny-shapes-orange-lora (the colour "orange" for the bundled model, ~9 min on 1 CPU thread)
# and measure its adherence on 30 captions; its README.md says what it does.
lora: setup
	OMP_NUM_THREADS=1 $(PY) script/train-lora --minutes 9 --lr 6e-3 --orange-fraction 0.7 --guided-weight 3 --check 30

# The bundled transformer model weights/tiny-shapes-flux, the FluxPipeline twin of tiny-shapes, into build/
# (one run of script/train-flux-reference on 1 CPU thread, about 2 hours; interrupted, it resumes from its
# checkpoint in build/flux-reference). weights/tiny-shapes-flux/README.md says what it does.
.PHONY: reference-flux-model
reference-flux-model: build/tiny-shapes-flux/training.json

build/tiny-shapes-flux/training.json: | setup
	OMP_NUM_THREADS=1 $(PY) script/train-flux-reference --out build/tiny-shapes-flux --work build/flux-reference \
		--minutes 110 --seed 1
