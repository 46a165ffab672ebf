"""Seeded random projections of per-example gradients (projection) and the shared embedding function
that the indexer and the service both call (embedding).
"""
