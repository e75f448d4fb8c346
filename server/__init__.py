"""Hearth server: FastAPI app, OpenAI and Ollama protocols, and the inference engine."""
