"""Installed as ``sitecustomize.py`` in the argilla-server virtualenv (by ``annotation.install``).

Why: argilla-server updates a record's responses in the search index with a Painless *script*
update (``ctx._source.responses.add(...)``). osmem-server, the in-memory OpenSearch stand-in we
run locally, does not execute scripts ("update with script is not supported"), so every review a
person submitted in the UI came back as a 500 (the response itself was saved in SQLite). This
replaces the two script updates with a read-modify-write of the same document, producing exactly
the document the script would have produced. Against a real Elasticsearch/OpenSearch deployment
this file is not installed and argilla-server runs unchanged.

The module must stay importable without argilla_server (pip runs in the same virtualenv).
"""

import uuid


def _jsonable(value):
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("argilla_server"):
        return value.value  # argilla_server enums (response status)
    return value


def _install():
    from argilla_server.search_engine import commons

    engine = commons.BaseElasticAndOpenSearchEngine

    async def _current_responses(self, index, record_id):
        doc = await self.client.get(index=index, id=record_id)
        return list((doc.get("_source") or {}).get("responses") or [])

    async def update_record_response(self, response):
        record = response.record
        index = commons.es_index_name_for_dataset(record.dataset)
        rid = str(record.id)
        mapped = _jsonable(self._map_record_response_to_es(response))
        responses = [r for r in await _current_responses(self, index, rid) if r.get("id") != mapped.get("id")]
        responses.append(mapped)
        await self._update_document_request(index, id=rid, body={"doc": {"responses": responses}})

    async def delete_record_response(self, response):
        record = response.record
        index = commons.es_index_name_for_dataset(record.dataset)
        rid = str(record.id)
        responses = [r for r in await _current_responses(self, index, rid) if r.get("id") != str(response.id)]
        await self._update_document_request(index, id=rid, body={"doc": {"responses": responses}})

    engine.update_record_response = update_record_response
    engine.delete_record_response = delete_record_response


try:
    _install()
except ModuleNotFoundError:  # pip or another tool running in the venv before argilla-server is installed
    pass
