# The two commands in README.md: `make demo` runs the main job on a small built-in default,
# `make test` runs lint and the test suite. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch 2.13.0 is installed first and pinned, so no other requirement can pull
# a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint format venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

demo: venv
	$(PY) -m rwkv_train.demo $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest exits 5 when it collected nothing: treat that as a failure too, not a pass.
test: lint
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build dist *.egg-info
