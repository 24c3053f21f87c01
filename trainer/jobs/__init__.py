"""Offline inference jobs of mva-infer; shared pieces (model/store checks, chunked output) in common.py."""
