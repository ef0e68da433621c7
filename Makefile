# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
STAMP := $(VENV)/.setup-done

.PHONY: demo test setup clean
demo: $(STAMP)
	scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

setup $(STAMP): pyproject.toml scripts/setup.sh train/jpeg_region.c shards/tarpack.c prep/jpegcheck.c
	scripts/setup.sh $(VENV)

clean:
	rm -rf demo .pytest_cache
