"""`conch serve`: the neurons and the EGO behind an OpenAI-compatible API."""
