"""``captioner serve``: the web page and JSON API (see ``captioner.serve``)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from captioner.commands.common import (
    UsageError,
    add_device_argument,
    add_quantize_argument,
    load_model,
)

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="web page + JSON API: caption an image and see where the model looked",
        description="Serve a web page (GET /) and a JSON API (POST /api/caption, GET /healthz) for one "
        "checkpoint. Binds to 127.0.0.1 unless --host says otherwise; there is no authentication "
        "(put a reverse proxy with authentication in front to share it: docs/usage.md). Logs one line "
        "per request: client, method, path, status, milliseconds.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `captioner fit`, a model folder (`captioner export`) or hf://OWNER/NAME")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0: every interface, "
                        "so anyone who can reach the machine can use it)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image file (default: 10)")
    add_device_argument(p)
    add_quantize_argument(p)
    p.add_argument("--max-batch", type=int, default=8, help="images per model call (default: 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="images waiting or running before requests get 503 (default: 64)")
    p.add_argument("--max-connections", type=int, default=128,
                   help="open connections before new ones get 503 (default: 128)")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1", metavar="IPS",
                   help="comma-separated addresses or networks of reverse proxies whose X-Forwarded-For and "
                        "X-Forwarded-Proto are believed (the client in the access log); '*' trusts any "
                        "(default: 127.0.0.1, a proxy on this machine)")
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(a: argparse.Namespace) -> int:
    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {a.port}")
    if a.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be > 0, got {a.max_upload_mb}")
    for flag, value in (("--max-batch", a.max_batch), ("--max-queue", a.max_queue),
                        ("--max-connections", a.max_connections)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    try:
        import uvicorn

        from captioner.serve import create_app
    except ImportError as err:
        raise UsageError(f"captioner serve needs the serve extra ({err.name} is missing): "
                         "pip install 'captioner[serve]'") from None
    loaded = load_model(a.checkpoint, a.device)
    try:
        app = create_app(loaded, max_upload_mb=a.max_upload_mb, max_batch=a.max_batch, max_queue=a.max_queue,
                         quantize=a.quantize)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--quantize {a.quantize}: {err}") from None
    if not _is_loopback(a.host):
        logger.warning("listening on %s: anyone who can reach this address can use the model "
                       "(there is no authentication)", a.host)
    shown = f"[{a.host}]" if ":" in a.host else a.host
    logger.info("captioner: open http://%s:%d/ in a browser (Ctrl+C stops)", shown, a.port)
    # access_log off: the app logs each request itself (captioner.serve.access), with its time
    uvicorn.run(app, host=a.host, port=a.port, log_level="info", server_header=False,
                limit_concurrency=a.max_connections, access_log=False, proxy_headers=True,
                forwarded_allow_ips=a.forwarded_allow_ips)
    return 0
