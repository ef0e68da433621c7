"""ImageNet layout knowledge and the `prep` command line."""

__version__ = "0.1.0"
