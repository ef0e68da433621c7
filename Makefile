# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
STAMP := $(VENV)/.setup-done

.PHONY: demo demo-s3 test test-fast setup clean gpu-check gpu-wheels rivals
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

# MosaicML streaming and litdata for scripts/bench_rivals.py, beside the toolkit's venv (not
# in it: mosaicml-streaming pins numpy<2.2 and imports transformers). --no-deps with the
# modules they import: pip would otherwise replace numpy, torch and huggingface-hub.
# Without obstore: litdata's obstore path refuses a plain-http endpoint ("builder error:
# BadScheme", it builds its client without allow_http), and falls back to boto3 without it.
rivals: $(STAMP)
	$(VENV)/bin/pip install -q --no-deps --target .rivals mosaicml-streaming==0.13.0 \
	  litdata==0.2.76 lightning-utilities tifffile xxhash zstd python-snappy cramjam \
	  Brotli catalogue "transformers<5" regex requests certifi "huggingface-hub>=0.34,<1.0" \
	  "tokenizers>=0.22,<=0.23.0" safetensors charset-normalizer

setup $(STAMP): pyproject.toml scripts/setup.sh train/jpeg_region.c shards/tarpack.c prep/jpegcheck.c \
		prep/fastdir.c
	scripts/setup.sh $(VENV)

clean:
	rm -rf demo .pytest_cache
