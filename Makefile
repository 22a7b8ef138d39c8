# Dualkey. `make run` runs the whole system (dualkey run: vault, agent,
# tripwire, gate, a local PostgreSQL); `make test` is what CI runs.
# Every target that needs tools depends on `setup`, which installs only what
# is missing and takes well under a second when nothing is.

SHELL      := /bin/bash
.SHELLFLAGS := -euo pipefail -c
GO         ?= go
GOPATH_BIN := $(shell PATH=/usr/local/go/bin:$$PATH $(GO) env GOPATH 2>/dev/null)/bin
export PATH := $(GOPATH_BIN):/usr/local/go/bin:$(PATH)

BIN        := bin/dualkey
FUZZTIME   ?= 20000x
TESTFLAGS  ?=

.PHONY: all setup setup-bench build run demo test test-short bench fuzz clean

all: build

setup:
	@scripts/setup.sh

setup-bench:
	@scripts/setup.sh bench

VERSION    := $(shell git describe --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/dualkey

# Everything in one process on ./dualkey-data until Ctrl-C (docs/run.md);
# RUNFLAGS passes flags, e.g. RUNFLAGS='--pg postgres://...'.
RUNFLAGS   ?=
run: setup build
	$(BIN) run $(RUNFLAGS)

# The vault alone: backups, restore, verify of a sample tree (scripts/demo.sh).
demo: setup build
	@scripts/demo.sh

test: setup
	@out=$$(find . -name '*.go' -not -path './dualkey-data/*' -not -path './bin/*' -not -path './.git/*' -print0 | xargs -0 -r gofmt -l); \
	if [[ -n "$$out" ]]; then echo "gofmt: these files need formatting:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	staticcheck ./...
	$(GO) test -race -timeout 20m $(TESTFLAGS) ./...

test-short: setup
	$(GO) test -short $(TESTFLAGS) ./...

bench: setup-bench build
	bench/run.sh

# Each Fuzz target runs alone for $(FUZZTIME); crashers land in testdata/fuzz.
# A count, not a duration: Go 1.26's coordinator can fail a time-bounded run
# at its end with "context deadline exceeded" (go.dev/issue/75804).
# A package whose tests do not compile fails the target rather than being skipped.
fuzz: setup
	@for pkg in $$($(GO) list -f '{{if or .TestGoFiles .XTestGoFiles}}{{.ImportPath}}{{end}}' ./...); do \
		list=$$($(GO) test -list '^Fuzz' $$pkg); \
		for f in $$(grep '^Fuzz' <<<"$$list" || true); do \
			echo "fuzz: $$pkg $$f ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg; \
		done; \
	done

# Removes the binary and the demo's vault, sample and restores.
clean:
	rm -rf bin/ dualkey-data/
