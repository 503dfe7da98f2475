"""The bare endpoint: FastAPI on uvicorn answering ``POST /transaction`` with the service's JSON
shape and no work, plus a push sink (``PUT /transaction``) that records when each outcome came.

``python -m benchmarks.bare_app --port P``; ``GET /_pushes`` returns the sink's record.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import uvicorn
from fastapi import Body, FastAPI

from resilient_payout.cli._procs import tune_gc as _tune_gc

app = FastAPI()
_pushes: dict[str, float] = {}


@app.post("/transaction")
async def transaction(body: dict[str, Any] = Body(...)) -> dict[str, str]:  # noqa: B008
    """Same answer size as the service's ``{"id", "status"}``, no work."""
    return {"id": str(body.get("id")), "status": "pending"}


@app.put("/transaction")
async def push(body: dict[str, Any] = Body(...)) -> dict[str, str]:  # noqa: B008
    """The app backend's push sink: remember the first push time of each id."""
    _pushes.setdefault(str(body.get("id")), time.time())
    return {"ok": "true"}


@app.get("/_pushes")
async def pushes() -> dict[str, Any]:
    """Every id pushed so far with its (wall clock) time."""
    return {"count": len(_pushes), "times": _pushes}


@app.post("/_pushes/reset")
async def reset() -> dict[str, str]:
    """Forget the pushes."""
    _pushes.clear()
    return {"ok": "true"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Ready."""
    return {"status": "ok"}


def main() -> None:
    """Serve on 127.0.0.1."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ns = ap.parse_args()
    _tune_gc()  # the same process settings as `resilient-payout serve`
    uvicorn.run(app, host="127.0.0.1", port=ns.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
