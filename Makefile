# The two commands a fresh machine needs: `make demo` and `make test` (`make check` for the inner loop).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv check test demo bench bench-models endurance contract soak system-tools clean wheelhouse image \
	test-image vast-template

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use, installed where missing and we may: systemd-analyze verifies the
# unit file; chromium renders the /docs page; prometheus (server and promtool) checks the rules
# and scrapes a real worker.
system-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	  else echo "systemd-analyze missing: the unit-file test will be skipped"; fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: the /docs browser test will be skipped"; fi; }
	@{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null; \
	  else echo "prometheus/promtool missing: the Prometheus tests will be skipped"; fi; }
	@{ command -v podman && command -v mmdebstrap && command -v runc; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      podman runc mmdebstrap uidmap slirp4netns >/dev/null; \
	  else echo "podman/mmdebstrap/runc missing: the container image tests will be skipped"; fi; }

# The tiers (tests/support/tiers.py). `make check`: the unit and in-process tests, no process
# started (a guard fails a test that starts one without its mark), well under 90 s on two cores.
# `make test`: everything CI runs. The tests run in parallel (pytest-xdist, TEST_WORKERS workers,
# chosen by measurement: docs/development.md; loadgroup keeps a module's shared daemon on one
# worker), then the container image's tests, which build the image, on their own.
CHECK_TIER := not (browser or e2e or image or real_comfyui or real_processes or slow)
TEST_WORKERS ?= 4

check: $(STAMP)
	$(BIN)/python -m pytest -m "$(CHECK_TIER)" $(PYTEST_ARGS)

test: $(STAMP) system-tools
	$(BIN)/python -m pytest -m "not image" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m image $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: no image tests here

# The contract tests at length: every Schemathesis phase (coverage included), more cases.
contract: $(STAMP)
	CONTRACT_EXAMPLES=$${CONTRACT_EXAMPLES:-200} CONTRACT_PHASES=examples,coverage,fuzzing,stateful \
	  CONTRACT_TIMEOUT=1500 $(BIN)/python -m pytest tests/test_contract.py --timeout=3600 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.perf.wrapper_latency
	$(BIN)/python -m tests.perf.stack_latency
	$(BIN)/python -m tests.perf.multi_instance --gpus 4

# Download throughput against curl and the daemon's memory while fetching a 2 GiB model (minutes).
bench-models: $(STAMP)
	$(BIN)/python -m tests.perf.model_download

# A long run: 30,000 requests with 1 MB outputs through the whole worker, and what stays flat
# (memory, open files, tasks, the output folder); ENDURANCE_REQUESTS to change the count.
ENDURANCE_REQUESTS ?= 30000
endurance: $(STAMP)
	$(BIN)/python -m tests.perf.endurance --requests $(ENDURANCE_REQUESTS)

# The chaos soak: the whole stack under load with seeded faults, for minutes (SOAK_SECONDS, SOAK_SEED).
SOAK_SECONDS ?= 300
SOAK_SEED ?= 7
soak: $(STAMP)
	$(BIN)/python -m tests.soak --seconds $(SOAK_SECONDS) --seed $(SOAK_SEED)

# The container image (docs/container.md). `make wheelhouse` puts every dependency as a wheel in
# ./wheelhouse for `docker build`; `make image` builds with podman here (FROM a minimal Debian
# made from Debian's packages, or BASE_IMAGE=...), `make test-image` runs the image's tests and
# `make vast-template` starts it as a Vast template would, against a stand-in autoscaler.
WHEELHOUSE ?= wheelhouse
wheelhouse: $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip wheel -q -w $(WHEELHOUSE) . 'setuptools>=77' wheel
	rm -f $(WHEELHOUSE)/comfy_worker-*.whl

image: $(STAMP) system-tools
	$(BIN)/python -m tests.support.image_harness build $(if $(BASE_IMAGE),--base $(BASE_IMAGE))

test-image: $(STAMP) system-tools
	$(BIN)/python -m pytest tests/test_image.py $(PYTEST_ARGS)

vast-template: $(STAMP) system-tools
	$(BIN)/python -m tests.support.vast_template --build

demo: $(STAMP)
	$(BIN)/comfy-worker demo

clean:
	rm -rf $(VENV) .demo-state build *.egg-info wheelhouse
