"""Offline jobs: LVLM refinement, index builds, precision variants and the annotation join.

They sit above the services (a job may use the gateway's engine, refine client or collections) and below the
command line. All of them read and write webdataset shards through ``hqclip.shards``.
"""
