"""The core of the feedback loop: what every layer shares, importing nothing above it.

Paths and I/O helpers, the one error base (``errors``), the config loader and the shared sections,
the store and its migrations, the durable mirror, the registry, feedback and its reasons, the
forget ledger, the chat-template rule, the probe set, and the maths of the arena and the canary.
``app``, ``annotation`` and ``trainer`` import only this (and the standard library and third
parties); the rest of ``loop`` (the conductor) imports them. The import-linter contracts in
pyproject.toml enforce it; docs/architecture.md draws it.
"""
