"""GET /v1/models and /v1/models/{id}: the served models as OpenAI model cards."""

from __future__ import annotations

from fastapi import Request

from server.openai.common import registry_of
from server.openai.protocol import ModelCard, ModelList
from server.registry import ServedModel


async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(served) for served in registry_of(request).listed()])  # loaded or not, adapters


async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return model_card(registry_of(request).describe(model_id))


def model_card(served: ServedModel) -> ModelCard:
    engine = getattr(served, "engine", None)  # None: not loaded (facts from config.json, server/registry.py)
    return ModelCard(id=served.model_id, created=served.created, max_model_len=served.max_seq_len or None,
                     compute=engine.compute() if hasattr(engine, "compute") else None,
                     parent=getattr(served, "parent", None))
