"""Embeddings for the OpenAI and Ollama APIs (router.py); the engine side is server/engine/pooling.py."""
