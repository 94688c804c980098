"""OpenAI-compatible HTTP front end of the gateway (FastAPI on uvicorn, in the gateway's event loop)."""
