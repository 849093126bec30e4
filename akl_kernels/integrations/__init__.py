"""Integrations with training frameworks (imported on demand: ``transformers`` is optional)."""
