"""redblue: red- and blue-teaming image classifiers."""

__version__ = "0.1.0"
