"""vLLM integration: the plugin, the δ-mem model classes, the async engine facade."""
