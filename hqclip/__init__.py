"""HQ-CLIP's layers around training and services: the formats both sides share (``repo``: the model repository;
``shards``: webdataset shards with the VLM-150M fields), the offline jobs (``jobs``) and the command line (``cli``).

Import order, bottom to top: ``hqclip.repo`` and ``hqclip.shards`` (torch-free, import neither side) <- ``training``
and ``services`` (never each other) <- ``hqclip.jobs`` (may import services) <- ``hqclip.cli`` (everything, lazily).
"""
