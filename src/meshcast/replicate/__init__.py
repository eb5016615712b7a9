"""Bulk file replication (ALM-FastReplica, seed 002): plans, the sans-I/O transfer engine,
manifests and chunk verification. File access goes through an injected `ChunkStore`;
streams and control messages are effects the daemon's driver carries out.

Theory of operation: docs/design/replicate.md.
"""
