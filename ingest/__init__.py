"""openai-audit-ingest: an exact copy of an OpenAI organization's audit log in your warehouse."""

__version__ = "0.1.0"
