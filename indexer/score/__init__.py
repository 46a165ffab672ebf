"""Exact TracIn scores of a query against chosen training rows, the second stage of retrieval (exact),
and the query metrics whose influence can be asked for (metrics).
"""
