"""llamazip: a language model as one executable file."""

__version__ = "0.1.0"
