"""Sieve's indexes: documents in, segments on disk, candidates out."""
