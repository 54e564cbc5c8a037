"""`difflab studio`: serve the local web app (sample, guide, edit, watch the chain) over a runs folder.

    difflab studio                                  # runs/ on http://127.0.0.1:7860 (the API's docs at /docs)
    difflab studio --runs out/ --port 8000
    difflab studio --host 0.0.0.0 --token SECRET    # another address needs a token (one is generated if not given)

The library does the work (difflab/studio/); this module parses, checks and prints."""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

from .options import UsageError, positive_int

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def needs_token(host: str) -> bool:
    """Whether binding ``host`` needs a token: anything but the loopback address."""
    if host in LOOPBACK:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def run(args) -> None:
    try:
        import uvicorn

        from ..studio.app import create_app
        from ..studio.jobs import Limits
    except ImportError as e:
        raise UsageError(f"the studio needs its extra: pip install 'difflab[studio]' ({e.name} is missing)") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be within 1..65535, got {args.port}")
    if args.preview_every < 0:
        raise UsageError(f"--preview-every must be 0 (no previews) or more, got {args.preview_every}")
    runs = Path(args.runs)
    if not runs.is_dir():
        if args.runs != "runs":
            raise UsageError(f"--runs {runs}: no such folder")
        runs.mkdir()  # the default folder, where `make demo` writes: created empty, the shipped models beside it
    token = args.token
    if token is None and needs_token(args.host):
        token = secrets.token_urlsafe(18)
        print(f"binding {args.host} needs a token; generated one: {token}")
    limits = Limits(
        max_steps=args.max_steps, max_batch=args.max_batch, max_queue=args.max_queue, preview_every=args.preview_every
    )
    app = create_app(runs, token=token, limits=limits, device=args.device)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"difflab studio: http://{shown}:{args.port}/{'?token=' + token if token else ''}  (runs: {runs.resolve()})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def register(sub) -> None:
    p = sub.add_parser("studio", help="serve the local web app over a runs folder")
    p.add_argument("--runs", default="runs", help="the runs folder (default runs/, where `make demo` writes)")
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to bind (default the loopback; any other needs a token)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="every request must carry it (?token=, a cookie, or Authorization: Bearer)")
    p.add_argument("--device", default="cpu", help="where the runs sample (cpu, cuda)")
    p.add_argument("--max-steps", type=positive_int, default=200, help="the most sampling steps a job may ask for")
    p.add_argument("--max-batch", type=positive_int, default=16, help="the most images a job may ask for")
    p.add_argument("--max-queue", type=positive_int, default=16, help="queued jobs beyond this are refused (429)")
    p.add_argument("--preview-every", type=int, default=5, help="steps between two live previews (0: none)")
    p.set_defaults(func=run)
