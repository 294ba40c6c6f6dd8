"""The HTTP edge: OpenAI API, auth, SSE, errors, /metrics, admin (/running, /unload).

Public surface: `dormant.gateway.server.serve(cfg)` (blocking) and `create_app(cfg)` (ASGI).

    server.py     app factory, uvicorn, the readiness line, shutdown
    routes.py     thin routes: parse with dormant.protocol, resolve the model, forward
    proxy.py      held requests, SSE keep-alives, relaying streams, usage accounting
    auth.py       Bearer keys (hmac.compare_digest) on every route but /health
    body.py       request bodies: the size limit (413), JSON depth, surrogates, NaN (400)
    metrics.py    Prometheus text, vLLM names under `dormant:`
    responses.py  OpenAI error bodies and SSE error events

Never imports torch.
"""
