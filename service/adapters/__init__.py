"""Retrievers for RAG frameworks over Sieve's gRPC client: `langchain` and `llamaindex` (optional extras)."""
