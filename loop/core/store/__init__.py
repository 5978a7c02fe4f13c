"""The durable log of every turn and every piece of feedback (SQLite under LOOP_HOME): ``Store``, the rows
it takes (``rows``) and the schema's migrations (``migrations``). ``store.py`` states the store's contract."""

from loop.core.store.rows import ROW_TYPES, NewConversation, NewFeedback, NewRow, NewTurn, row_from_json, row_to_json
from loop.core.store.store import Store

__all__ = ["ROW_TYPES", "NewConversation", "NewFeedback", "NewRow", "NewTurn", "Store", "row_from_json",
           "row_to_json"]
