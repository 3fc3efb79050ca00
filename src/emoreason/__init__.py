"""emoreason: teach audio LLMs to reason about emotion in speech."""

__version__ = "0.1.0"
