# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
STAMP := $(VENV)/.setup-done

.PHONY: demo demo-s3 test test-fast setup clean gpu-check gpu-wheels
demo: $(STAMP)
	scripts/demo.sh

# the same pipeline against object storage: a local S3 server (SeaweedFS) it starts and stops
demo-s3: $(STAMP)
	scripts/demo_s3.sh

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

# the edit-test loop: everything but the tests marked slow (full-scale trees, torchrun,
# kills, real readers' start-up)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not slow"

# On the GPU machine (its own torch, no package index): `python3 scripts/gpu_check.py`.
# The wheels it lacks are prepared here first (pure Python, a few hundred KB).
gpu-wheels:
	$(VENV)/bin/pip download -q --no-deps -d .gpu-wheels webdataset braceexpand defusedxml

gpu-check:
	python3 scripts/gpu_check.py --out gpu-check

setup $(STAMP): pyproject.toml scripts/setup.sh train/jpeg_region.c shards/tarpack.c prep/jpegcheck.c
	scripts/setup.sh $(VENV)

clean:
	rm -rf demo .pytest_cache
