# provisiond — the two commands a user needs are `make run` and `make test`.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CTEST_ARGS ?=
ARGS ?=
# Let ccache hit across clones of the repo (CI builds in a fresh clone).
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

.PHONY: all deps configure build run test test-asan test-tsan fuzz fuzz-build bench clean

all: build

deps:
	@scripts/install-deps.sh

configure: deps
	@if [ ! -f $(BUILD_DIR)/build.ninja ]; then \
	  cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE); \
	fi

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

run: build
	$(BUILD_DIR)/bin/provisiond serve $(ARGS)

test: build
	@scripts/install-test-deps.sh
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) $(CTEST_ARGS)

# The whole suite built with AddressSanitizer and UndefinedBehaviorSanitizer
# in its own build dir; any report fails the test that triggered it. Debian's
# libraries are not instrumented: ASan still sees our accesses to their memory,
# not their internal bugs.
ASAN_DIR ?= build-asan
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
test-asan: deps
	@if [ ! -f $(ASAN_DIR)/build.ninja ]; then \
	  cmake -S . -B $(ASAN_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DPROV_BUILD_BENCHMARKS=OFF -DCMAKE_CXX_FLAGS="$(SANITIZE)" \
	    -DCMAKE_EXE_LINKER_FLAGS="$(SANITIZE)" -DCMAKE_SHARED_LINKER_FLAGS="$(SANITIZE)"; \
	fi
	@cmake --build $(ASAN_DIR) -j $(JOBS)
	@scripts/install-test-deps.sh
	cd $(ASAN_DIR) && UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(JOBS) $(CTEST_ARGS)

# ThreadSanitizer (docs/sanitizers.md, not part of `make test`): the
# unit tests and the integration tests that need no Kafka and finish in
# minutes, built in build-tsan/ (only those targets). Every process, the
# provisiond servers the integration tests start included, writes its
# reports to build-tsan/tsan-reports/; any report fails the target.
# tests/tsan.supp only drops the libc calls of Debian's uninstrumented
# CAF and RocksDB; CAF's handoffs are modelled (tests/tsan/), and the
# tsan_race_* tests prove a race in actor code still reports.
# TSAN_TESTS / TSAN_TARGETS narrow it.
TSAN_DIR ?= build-tsan
TSAN_FLAGS := -fsanitize=thread -fno-omit-frame-pointer -g
TSAN_TARGETS ?= tsan_race_test test_messages test_config test_storage test_actors test_engine \
  test_gateway test_metrics provisiond it_service_api_test it_device_api_test it_secrets_test \
  it_startup_test it_bad_input_test
TSAN_TESTS ?= ^(tsan_.*|test_(messages|config|storage|actors|gateway|metrics)|it_(service_api|device_api|secrets|startup|bad_input)_test)$$
test-tsan: deps
	@if [ ! -f $(TSAN_DIR)/build.ninja ]; then \
	  cmake -S . -B $(TSAN_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DPROV_BUILD_BENCHMARKS=OFF -DPROV_USE_JEMALLOC=OFF -DCMAKE_CXX_FLAGS="$(TSAN_FLAGS)" \
	    -DCMAKE_EXE_LINKER_FLAGS="$(TSAN_FLAGS)" -DCMAKE_SHARED_LINKER_FLAGS="$(TSAN_FLAGS)"; \
	fi
	@cmake --build $(TSAN_DIR) -j $(JOBS) --target $(TSAN_TARGETS)
	@rm -rf $(TSAN_DIR)/tsan-reports && mkdir -p $(TSAN_DIR)/tsan-reports
	@cd $(TSAN_DIR) && TSAN_OPTIONS="suppressions=$(CURDIR)/tests/tsan.supp log_path=$(CURDIR)/$(TSAN_DIR)/tsan-reports/tsan second_deadlock_stack=1 history_size=4" \
	  ctest --output-on-failure -j $(JOBS) -R '$(TSAN_TESTS)' $(CTEST_ARGS); rc=$$?; \
	  cd $(CURDIR); reports=$$(ls $(TSAN_DIR)/tsan-reports/ 2>/dev/null); \
	  if [ -n "$$reports" ]; then \
	    echo "ThreadSanitizer reports in $(TSAN_DIR)/tsan-reports/:"; \
	    grep -h "^SUMMARY" $(TSAN_DIR)/tsan-reports/* | sort | uniq -c | sort -rn; rc=1; \
	  fi; exit $$rc

# libFuzzer campaigns (docs/fuzzing.md): clang-14 with ASan and UBSan in
# build-fuzz/, only the harnesses and the libraries they use. Each harness
# runs FUZZ_SECONDS (or FUZZ_RUNS executions, when set) from its seed corpus
# in tests/fuzz/corpus/<name>/; what it finds new goes to
# build-fuzz/corpus/<name>/, crashes to build-fuzz/crashes/. FUZZERS picks
# harnesses, FUZZ_ARGS adds libFuzzer flags (e.g. -jobs=2 -workers=2).
# `make test` does not need clang: it replays the corpora (fuzz_replay_*).
FUZZ_DIR ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?=
FUZZ_ARGS ?=
FUZZERS ?= http_request json_body sas_token config_toml registration_codec x509_chain websocket \
  mqtt_codec tpm
FUZZ_SANITIZE := -fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -g
fuzz-build:
	@PROV_FUZZ_DEPS=1 scripts/install-deps.sh
	@if [ ! -f $(FUZZ_DIR)/build.ninja ]; then \
	  CC=clang-14 CXX=clang++-14 cmake -S . -B $(FUZZ_DIR) -G Ninja \
	    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPROV_BUILD_FUZZERS=ON \
	    -DPROV_BUILD_TESTS=OFF -DPROV_BUILD_BENCHMARKS=OFF \
	    -DCMAKE_CXX_FLAGS="$(FUZZ_SANITIZE)" -DCMAKE_EXE_LINKER_FLAGS="$(FUZZ_SANITIZE)"; \
	fi
	@cmake --build $(FUZZ_DIR) -j $(JOBS)

fuzz: fuzz-build
	@mkdir -p $(FUZZ_DIR)/crashes
	@set -e; for f in $(FUZZERS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$f; \
	  echo "== fuzz_$$f"; \
	  UBSAN_OPTIONS=print_stacktrace=1 $(FUZZ_DIR)/fuzz/fuzz_$$f \
	    $(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS),-max_total_time=$(FUZZ_SECONDS)) \
	    -artifact_prefix=$(FUZZ_DIR)/crashes/$$f- -print_final_stats=1 $(FUZZ_ARGS) \
	    $(FUZZ_DIR)/corpus/$$f tests/fuzz/corpus/$$f; \
	done

# Without ARGS: the default suite (benchmarks/run-suite.sh, a few minutes).
# With ARGS: one provisiond-bench run, e.g. make bench ARGS="--devices 1000".
bench: build
	@if [ -n "$(ARGS)" ]; then $(BUILD_DIR)/bin/provisiond-bench $(ARGS); \
	else benchmarks/run-suite.sh $(BUILD_DIR); fi

clean:
	rm -rf $(BUILD_DIR)
