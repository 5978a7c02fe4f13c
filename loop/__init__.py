"""The feedback loop: the core every layer shares (``loop.core``) and, around it, the conductor (cycle,
stages, schedule, demo, versions CLI, forget, rollout, lineage, ...), the only layer that imports
``app``, ``annotation`` and ``trainer``. docs/architecture.md has the layers."""

__version__ = "0.1.0"
