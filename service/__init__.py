"""tracin-service online half: a FastAPI app that serves an index directory built by `indexer`.

    tracin serve DIR                       # or: python -m service.server DIR
    from service.client import InfluenceClient

Modules: settings (TRACIN_* environment), engine (loaded index + query logic), app (`create_app`),
routes, schemas, errors, metrics, server (uvicorn launch), client (httpx, sync and async).
"""
