"""Retrieval: FAISS collections with SQLite metadata and a write-ahead log (store), the set of them a gateway
serves (manager), and offline builds from folders of images or webdataset shards (build)."""
