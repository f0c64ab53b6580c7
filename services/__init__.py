"""HQ-CLIP gateway: reads a model repository, serves embeddings, classification, tags, retrieval, refinement."""
