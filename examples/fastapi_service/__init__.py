"""The example payout service: :func:`resilient_payout.fastapi.create_app` configured from RP_*."""
