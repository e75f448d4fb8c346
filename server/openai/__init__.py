"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models (the Responses API is server/responses/).

protocol (request and answer models), common (what chat and completions share:
the answer header, usage, logprob shapes, SSE framing), chat, completions,
models, router (the one APIRouter app.py includes).
"""
