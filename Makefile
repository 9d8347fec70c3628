PY := .venv/bin/python
PROMPT ?= a red square in the center

.PHONY: setup test generate serve
setup:
	bash script/setup

test: setup
	$(PY) -m pytest

