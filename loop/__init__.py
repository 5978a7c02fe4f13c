"""The core of the feedback loop: config, store, registry, and the conductor (cycle, schedule)."""

__version__ = "0.1.0"
