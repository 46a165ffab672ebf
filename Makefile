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
# Ray for distributed indexing)
# and of `make demo` (none: serving the digits demo needs only the core dependencies).
EXTRAS ?= test,text,huggingface,lightning,ray
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
.PHONY: setup system-deps demo test clean

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

test: setup system-deps
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tracin
