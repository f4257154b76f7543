# provisiond — the two commands a user needs are `make run` and `make test`.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CTEST_ARGS ?=
ARGS ?=
# Let ccache hit across clones of the repo (CI builds in a fresh clone).
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

.PHONY: all deps configure build run test test-asan bench clean

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

# Without ARGS: the default suite (benchmarks/run-suite.sh, a few minutes).
# With ARGS: one provisiond-bench run, e.g. make bench ARGS="--devices 1000".
bench: build
	@if [ -n "$(ARGS)" ]; then $(BUILD_DIR)/bin/provisiond-bench $(ARGS); \
	else benchmarks/run-suite.sh $(BUILD_DIR); fi

clean:
	rm -rf $(BUILD_DIR)
