"""GET /v1/models and /v1/models/{id}: the served models as OpenAI model cards."""

from __future__ import annotations

from fastapi import Request

from server.openai.common import registry_of
from server.openai.protocol import ModelCard, ModelList
from server.registry import ServedModel


async def list_models(request: Request) -> ModelList:
    registry = registry_of(request)
    model_ids = [*registry.models, *(registry.adapters or ())]  # base models, then LoRA adapters
    return ModelList(data=[model_card(registry.get(model_id)) for model_id in model_ids])


async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return model_card(registry_of(request).get(model_id))


def model_card(served: ServedModel) -> ModelCard:
    return ModelCard(id=served.model_id, created=served.created, max_model_len=served.max_seq_len,
                     compute=served.engine.compute() if hasattr(served.engine, "compute") else None,
                     parent=getattr(served, "parent", None))
