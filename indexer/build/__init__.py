"""Building an index directory: the embedding loops, resume and shards (pipeline), Ray tasks per shard
(distributed), label review and input ranges recorded at index time (review, input_ranges).
"""
