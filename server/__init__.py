"""The δ-mem server: OpenAI-compatible API, session turns, the vLLM engine integration."""
