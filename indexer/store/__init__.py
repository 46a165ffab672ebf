"""The index directory: its manifest, files and verification (directory, manifest), resumable build state
(resume), the FAISS first stage (search, faiss_build).
"""
