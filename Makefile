# The two commands of the README. `make train` and `make test` set up their own environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast train data clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The embedded corpus (the Python standard library's sources), tokenized with data/tokenizer.
data: setup data/cache/stdlib.bin

# make runs this only when the corpus is missing or older than the tokenizer: then it is replaced.
data/cache/stdlib.bin: data/tokenizer/tokenizer.json | $(STAMP)
	$(VENV)/bin/glm52 prepare-data --embedded --output-prefix data/cache/stdlib --overwrite

# Train the tiny model on CPU (checkpoint in checkpoints/tiny, run in runs/tiny, offline W&B).
train: data
	$(VENV)/bin/glm52 pretrain --config configs/tiny.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=15 tests

# The edit-test loop: everything not marked slow (a few minutes on 2 cores). CI runs `make test`.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=5 tests

clean:
	rm -rf $(VENV) runs checkpoints/tiny checkpoints/tiny.old-* data/cache
