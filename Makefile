# Two commands on a fresh machine:
#   make demo   set up .venv, train + index the embedded digits demo, serve it on 127.0.0.1:8000
#   make test   set up .venv (+ system packages for the browser and Fashion-MNIST tests), run the tests
#
# torch is pinned by constraints.txt. Where the CPU wheel is not on local disk, add the CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (GPU users: TORCH_INDEX=https://download.pytorch.org/whl/cu128, see docs/gpu.md.)
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
EXTRAS ?= test,text
TORCH_INDEX ?=
SYSTEM_PACKAGES := chromium chromium-driver fonts-dejavu-core dataset-fashion-mnist

.PHONY: setup system-deps demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) install -q -c constraints.txt --index-url $(TORCH_INDEX) torch)
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use (headless Chromium for the dashboard, the Fashion-MNIST data).
# Installed when running as root; otherwise the tests that need them are skipped with a reason.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else echo "not installing$$missing (needs root + apt): those tests will be skipped"; fi

demo: setup
	$(VENV)/bin/tracin demo --out .tracin/demo

test: setup system-deps
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tracin
