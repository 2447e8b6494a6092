"""``kernelforge serve``: an OpenAI-compatible HTTP server on the runtime's
continuous-batching engine (FastAPI + uvicorn; the ``serve`` extra).

    kernelforge serve --model path/to/model.gguf --port 8000
"""
