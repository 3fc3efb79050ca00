"""Serving: the built-in OpenAI-compatible server (transformers backend) and the vLLM plugin.

Nothing heavy is imported here, so that vLLM can load the plugin without FastAPI and the server without vLLM.
"""
