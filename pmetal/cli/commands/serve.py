"""Serve a model, adapter or run over an OpenAI-compatible HTTP API: pmetal serve --model runs/sft-x

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events),
GET /v1/models (the model and each --adapter by name), GET /health. Requests are batched onto
decode sessions on the rollout engine's cache, new ones joining the running rows at the next round
(continuous batching: pmetal/serve/scheduler.py); `model` in a request picks the base or an adapter. Binds 127.0.0.1 unless --host says otherwise; --api-key requires
`Authorization: Bearer KEY`. Needs the `serve` extra (pip install 'pmetal[serve]').
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="model, adapter or run directory, served under this name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter or run over the same base, served as model NAME (repeat for several)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ requests")
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="the most completions decoding at once per served model; a request with n takes n "
                        "(default %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="the most requests waiting beyond those; more get HTTP 429 (default %(default)s)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long an idle server waits for requests to batch together (default %(default)s)")
    p.add_argument("--kv-capacity", type=int, default=2048,
                   help="KV cache tokens per completion: its prompt plus max_tokens must fit (capped at the model's "
                        "context; default %(default)s)")
    p.add_argument("--sync-every", type=int, default=1,
                   help="decode rounds between reads of the device: tokens stream and requests join at those "
                        "points (default %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode round with torch.compile on CUDA (a compilation per batch shape)")
    p.add_argument("--accelerator", choices=["auto", "mps", "cuda", "cpu"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args) -> int:
    from pmetal.errors import PmetalError

    if args.max_concurrency < 1 or args.max_queue < 0 or args.kv_capacity < 2 or args.sync_every < 1:
        raise PmetalError(f"--max-concurrency and --sync-every must be >= 1, --max-queue >= 0, --kv-capacity >= 2, got "
                          f"{args.max_concurrency}, {args.sync_every}, {args.max_queue}, {args.kv_capacity}")
    try:
        import uvicorn
    except ImportError:
        raise PmetalError("pmetal serve needs the serve extra: pip install 'pmetal[serve]'") from None

    from pmetal.device import choose_device
    from pmetal.generation import stop_token_ids
    from pmetal.serve.app import create_app
    from pmetal.serve.models import load_served, parse_adapter_flag
    from pmetal.serve.scheduler import Scheduler

    adapters = [parse_adapter_flag(value) for value in args.adapter]
    choice = choose_device(args.accelerator)
    models = load_served(args.model, adapters, device=choice.torch_device, dtype=choice.weight_dtype,
                         trust_remote_code=args.trust_remote_code)
    tokenizer = models.tokenizer
    context = getattr(models.model.config, "max_position_embeddings", None) or args.kv_capacity
    scheduler = Scheduler(models, stop_ids=stop_token_ids(tokenizer, models.model), pad_token_id=tokenizer.pad_token_id,
                          max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          batch_window=args.batch_window_ms / 1000, kv_capacity=min(args.kv_capacity, context),
                          sync_every=args.sync_every, compile_decode=args.compile)
    app = create_app(models, scheduler, api_key=args.api_key)
    logging.getLogger("pmetal").info("serving %s on %s (http://%s:%d/v1)", ", ".join(models.ids), choice.torch_device,
                                     args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        scheduler.close()
    return 0
