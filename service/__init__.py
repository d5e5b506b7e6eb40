"""Sieve's service: gRPC front, batching, operation."""
