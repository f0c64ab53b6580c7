"""The model-repository format: the one contract between training (which writes it) and services (which read it).

Torch-free, and it imports neither ``training`` nor ``services``: the manifest, the folder layout, the tokenizers and
image preprocessing the towers expect, Triton's ``config.pbtxt`` files and the atomic installer. model_repo/README.md
describes the format for people.
"""
