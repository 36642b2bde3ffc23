# The README's two commands: `make run` (server on the default model) and `make test` (every
# test). Both install what is missing first (scripts/setup.sh) and are idempotent.
JOBS ?= $(shell nproc)
BUILD ?= build

.PHONY: all deps model build run test coverage format clean

all: build

deps:
	@scripts/setup.sh

model: deps

build:
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

run: deps build
	$(BUILD)/krserve serve

test: deps
	@scripts/test.sh

# line coverage of src/ by the whole test run; last line "coverage: NN.N% of src/ lines"
coverage: deps
	@scripts/coverage.sh

format:
	@clang-format -i $$(git ls-files '*.c' '*.h' '*.cu')

clean:
	rm -rf build build-*
