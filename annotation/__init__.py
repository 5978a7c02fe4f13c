"""Everything Argilla: the local stack (`annotation.server`, `annotation.install`), the dataset schema, push,
pull and priority. Receives and returns plain records; imports only the core (`loop.core`), never `app`,
`trainer` or the conductor.

Kept import-free so `python -m annotation.install` and `python -m annotation.server` start fast.
"""
