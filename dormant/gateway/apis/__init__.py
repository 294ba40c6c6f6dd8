"""Other APIs on the gateway's port, each translated into the chat/completions (or completions)
requests the worker serves and sent the one way every request goes (proxy.Proxy), so held
requests, wake-ups, metrics and auth apply to them as to OpenAI's.

    chat.py              the chat side's vocabulary: Reply, Delta, tool fields
    relay.py             send through the proxy; rewrite a stream with a Translator
    errors.py            each API's error shape, chosen by path
    openai_responses.py  POST /v1/responses (stateless)
    anthropic.py         POST /v1/messages
    ollama.py            /api/chat, /api/generate
    models.py            what a model folder says (max_model_len, /api/tags, /api/show)
    routes.py            the routes, thin
"""
