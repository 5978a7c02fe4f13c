"""The model registry: every version, its lineage, and the atomic ``current`` pointer.

Layout under ``$LOOP_HOME/registry``::

    versions/<id>/model.gguf      the served file (its sha256 is in version.json)
    versions/<id>/version.json    parent, base model, variant, snapshot hash, metrics, verification,
                                  tainted (trained on text forgotten since: when, why, which turns)
    versions/<id>/README.md       the model card (when the exporter wrote one)
    current.json                  {"version", "previous", "since", "reason"}: the one truth
    canary.json                   {"version", "baseline", "since", "share", "reason"}: the version
                                  a share of new conversations gets while users judge it (absent: none)
    canary.jsonl                  append-only: every canary started and ended, when, why, the numbers
    history.jsonl                 append-only: every promotion and rollback, when, why, by what
    pruned.jsonl                  ids removed by retention (never handed out again)
    published.jsonl               every publish (``loop.publish``): where each version went
    .lock                         flock serialising writers (cycle, CLI, app) across processes

Crash safety: a version directory is built under a temporary name and renamed into place, and
``current.json`` is replaced by write + fsync + rename + fsync(dir). A crash at any point leaves
either the old or the new version current, never a half-written pointer, and the app (which
re-reads the pointer per request) keeps serving whichever that is. The history line is written
after the pointer; a pointer newer than the history is reconciled before the next promotion
(``reconcile()``), which also removes what dead writers left behind.

Version ids match ``VERSION_ID`` (``v1``, ``v2``, ...) and nothing else: every method that takes an
id checks it with ``check_version_id`` before it touches a path, so ``v2/``, ``./v2``, ``../x`` or an
absolute path is refused (``InvalidVersionIdError``) instead of being stored in ``current.json``.
The canary pointer is written like ``current.json`` and is changed only by ``start_canary`` and
``end_canary`` (which promotes through ``promote``, so the history shows the promotion).
``canary_arm`` is the one routing rule: a conversation goes to the canary when a hash of its id
and the canary's id falls below the share, so it stays there for the whole conversation.

A registry file that cannot be read (a damaged ``current.json`` or ``version.json``) raises
``RegistryCorruptError`` naming the file and the repair; both are ``RegistryError``s, so every
caller that handles registry errors handles these. ``rollback(to=ID)`` replaces a damaged pointer
(the damaged file is kept beside it as ``current.json.damaged-<time>``).
"""

from loop.core.registry.base import RegistryBase
from loop.core.registry.published import published, record_published
from loop.core.registry.registry import Registry, canary_arm
from loop.core.registry.version import (
                                        VERSION_ID,
                                        InvalidVersionIdError,
                                        RegistryCorruptError,
                                        RegistryError,
                                        Version,
                                        check_version_id,
                                        is_version_id,
)

__all__ = [
    "VERSION_ID", "InvalidVersionIdError", "Registry", "RegistryBase", "RegistryCorruptError", "RegistryError",
    "Version", "canary_arm", "check_version_id", "is_version_id", "published", "record_published",
]
