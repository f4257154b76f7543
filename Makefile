# provisiond — the two commands a user needs are `make run` and `make test`.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CTEST_ARGS ?=
ARGS ?=
# Let ccache hit across clones of the repo (CI builds in a fresh clone).
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

.PHONY: all deps configure build run test bench clean

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

# Without ARGS: the default suite (benchmarks/run-suite.sh, a few minutes).
# With ARGS: one provisiond-bench run, e.g. make bench ARGS="--devices 1000".
bench: build
	@if [ -n "$(ARGS)" ]; then $(BUILD_DIR)/bin/provisiond-bench $(ARGS); \
	else benchmarks/run-suite.sh $(BUILD_DIR); fi

clean:
	rm -rf $(BUILD_DIR)
