"""Benchmarks of resilient_payout: ``python -m benchmarks``; see docs/performance.md."""
