# Two commands on a fresh machine:
#   make demo   set up .venv with what serving the demo needs, train + index the digits demo, serve it
#               (make demo PORT=8001 HOST=0.0.0.0 to listen elsewhere)
#   make test   set up .venv with the test extras (+ system packages for the browser and Fashion-MNIST
#               tests), run the tests
#
# torch is pinned by constraints.txt. Where the CPU wheel is not on local disk, add the CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (GPU users: TORCH_INDEX=https://download.pytorch.org/whl/cu128, see docs/gpu.md.)
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
# Extras of `make setup` / `make test` (the test suite, the text example, the training-loop callbacks,
# Ray for distributed indexing, Parquet / datasets folders for the built-in tasks)
# and of `make demo` (none: serving the digits demo needs only the core dependencies).
EXTRAS ?= test,text,huggingface,lightning,ray,data
DEMO_EXTRAS ?=
TORCH_INDEX ?=
HOST ?= 127.0.0.1
PORT ?= 8000
SYSTEM_PACKAGES := chromium chromium-driver fonts-dejavu-core dataset-fashion-mnist

# One stamp per set of extras, so that `make demo` then `make test` still installs the test extras.
comma := ,
stamp = $(VENV)/.installed-$(or $(subst $(comma),-,$(1)),core)
CREATED := $(VENV)/.created

.SUFFIXES:
.PHONY: setup system-deps demo test clean vision-venv

# torchvision for the built-in task torchvision.image_classification. PyPI's torchvision is a CUDA build that cannot
# be imported beside this project's CPU torch (constraints.txt), so its tests run in a second venv with the
# torch + torchvision pair below, made only where pip finds those wheels on local disk (file:// links: ~90 s and
# ~6 GB, no download); elsewhere tests/test_builtin_tasks.py skips them, saying why. With a torch from the CPU or
# CUDA index, `pip install -e '.[vision]'` in .venv is enough (the tests then run there).
VISION_VENV := .venv-vision
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(CREATED): constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) install -q -c constraints.txt --index-url $(TORCH_INDEX) torch)
	touch $@

$(VENV)/.installed-%: $(CREATED) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.$(if $(EXTRAS_NOW),[$(EXTRAS_NOW)])'
	touch $@

$(call stamp,$(EXTRAS)): EXTRAS_NOW = $(EXTRAS)
$(call stamp,$(DEMO_EXTRAS)): EXTRAS_NOW = $(DEMO_EXTRAS)

setup: $(call stamp,$(EXTRAS))

# Debian packages the tests use (headless Chromium for the dashboard, the Fashion-MNIST data).
# Installed when running as root; otherwise the tests that need them are skipped with a reason.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else echo "not installing$$missing (needs root + apt): those tests will be skipped"; fi

demo: $(call stamp,$(DEMO_EXTRAS))
	$(VENV)/bin/tracin demo --out .tracin/demo --host $(HOST) --port $(PORT)

vision-venv: $(call stamp,$(EXTRAS))
	@if [ -f $(VISION_VENV)/.installed ] && [ $(VISION_VENV)/.installed -nt pyproject.toml ]; then exit 0; fi; \
	if ! $(PIP) install -q --dry-run --ignore-installed --no-deps --report - $(VISION_TORCH) 2>/dev/null | \
	    $(VENV)/bin/python -c "import json, sys; r = json.load(sys.stdin)['install']; \
	      sys.exit(not r or not all(i['download_info']['url'].startswith('file:') for i in r))"; then \
	  echo "not making $(VISION_VENV): $(VISION_TORCH) are not on local disk (the torchvision tests will be skipped)"; \
	  exit 0; fi; \
	rm -rf $(VISION_VENV) && $(PY) -m venv $(VISION_VENV) && \
	$(VISION_VENV)/bin/pip install -q $(VISION_TORCH) && \
	$(VISION_VENV)/bin/pip install -q -e '.[test,vision]' && touch $(VISION_VENV)/.installed

test: setup system-deps vision-venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VISION_VENV) .tracin
