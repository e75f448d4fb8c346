"""Ollama's API under /api: protocol (request and answer models), generation (/api/chat,
/api/generate through the serving core), models (/api/tags, /api/ps, /api/show, /api/version),
router (the one APIRouter app.py includes).
"""
