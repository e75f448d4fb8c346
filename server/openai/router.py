"""The OpenAI routes under /v1: one table, one router for server/app.py (the Responses API has its own).

The handlers live in their modules (models, chat, completions) and are added
here directly, not as nested routers, so each route object carries its full
path (/metrics labels requests by it).
"""

from __future__ import annotations

from fastapi import APIRouter

from server.openai import chat, completions, models

router = APIRouter(prefix="/v1", tags=["openai"])
router.add_api_route("/models", models.list_models, methods=["GET"])
router.add_api_route("/models/{model_id}", models.retrieve_model, methods=["GET"])
router.add_api_route("/chat/completions", chat.chat_completions, methods=["POST"])
router.add_api_route("/completions", completions.completions, methods=["POST"])
