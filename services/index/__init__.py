"""Retrieval: one collection interface (collection), FAISS + SQLite (faiss_sqlite, vectors) and Milvus (milvus)
behind it, and the collections and aliases a gateway serves (manager). Offline builds: hqclip/jobs/index_build.py."""
