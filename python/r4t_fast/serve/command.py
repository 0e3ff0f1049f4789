"""``r4t serve --model RETRIEVER_DIR [--host 127.0.0.1 --port 8000]``: load, build the app, run uvicorn.

Everything cheap is checked before the model loads; a missing ``serve`` extra is a one-line error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from r4t_fast._internal import check_float, check_positive_int

__all__ = ["add_cli_arguments", "cli_main"]


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="retriever directory (r4t train-diffusion / r4t pipeline)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=64, help="most queries per batched call (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="longest wait for a batch to fill (ms)")
    p.add_argument("--max-queue", type=int, default=1024, help="queries waiting before 503 (default 1024)")
    p.add_argument("--workers", type=int, default=1, help="concurrent batched calls (default 1)")
    p.add_argument(
        "--catalog-dir",
        default=None,
        help="save accepted catalog changes here, crash-safely (and start from it when it exists)",
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )


def cli_main(args: argparse.Namespace) -> int:
    check_positive_int(args.port, "--port", upper=65535)
    check_positive_int(args.max_batch, "--max-batch")
    check_float(args.max_wait_ms, "--max-wait-ms", low=0.0, high=10_000.0)
    check_positive_int(args.max_queue, "--max-queue")
    check_positive_int(args.workers, "--workers", upper=64)
    model = Path(args.model)
    if not model.is_dir():
        raise FileNotFoundError(f"--model: no retriever directory at {model}")
    try:
        import uvicorn

        from r4t_fast.serve.app import create_app
    except ImportError as exc:
        raise ValueError(f"serve: needs the serve extra (pip install 'r4t_fast[serve]'): {exc}") from None
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.serve.state import ServeState

    state = ServeState(Retriever.from_pretrained(model), model_path=str(model), catalog_dir=args.catalog_dir)
    app = create_app(
        state,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        workers=args.workers,
    )
    print(f"r4t serve: http://{args.host}:{args.port}/  ({len(state.snapshot.catalog)} items)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
