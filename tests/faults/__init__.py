"""Fault-injection helpers of the reliability tests (tests/test_reliability_*.py)."""
