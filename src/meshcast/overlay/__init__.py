"""Overlay: daemon membership, routing trees, multi-destination forwarding."""
