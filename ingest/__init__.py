"""openai-audit-ingest: an exact copy of an OpenAI organization audit log in your warehouse."""
