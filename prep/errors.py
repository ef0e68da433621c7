"""The one error type the toolkit raises for bad input."""

from __future__ import annotations


class PrepError(Exception):
    """Bad input or a refused operation. The message names the file, what was
    expected and what to do; the CLI prints it without a traceback and exits 1."""
