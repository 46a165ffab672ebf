"""The index directory: its manifest, files and verification (directory, manifest), resumable build state
(resume), the FAISS first stage (search, faiss_build), and the load-time consistency check of the stored
numbers against their recomputation (consistency).
"""
