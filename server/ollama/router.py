"""The Ollama routes under /api: one table, one router for server/app.py.

The handlers live in their modules (generation, models) and are added here
directly, not as nested routers, so each route object carries its full path
(/metrics labels requests by it).
"""

from __future__ import annotations

from fastapi import APIRouter

from server.ollama import generation, models

router = APIRouter(prefix="/api", tags=["ollama"])
router.add_api_route("/chat", generation.chat, methods=["POST"])
router.add_api_route("/generate", generation.generate, methods=["POST"])
router.add_api_route("/tags", models.tags, methods=["GET"])
router.add_api_route("/ps", models.running, methods=["GET"])
router.add_api_route("/version", models.version, methods=["GET"])
router.add_api_route("/show", models.show, methods=["POST"], response_model_exclude_none=True)
