"""A plain asyncio worker over :mod:`resilient_payout.wiring`: no web framework."""
