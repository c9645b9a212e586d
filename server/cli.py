"""The `unmask` command line: `unmask generate` (engine/cli.py) and `unmask serve`, which loads a checkpoint
(default: the bundled model), starts the engine loop and serves the OpenAI API. `python -m server.cli ...` runs it
too.

SIGTERM / Ctrl-C: stop admitting (new requests and /health get 503), let in-flight requests finish for up to
--drain-timeout seconds, abort the rest (their clients get a clear 503 error, in-band for streams), stop the
engine and exit 0. A second Ctrl-C exits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from typing import Any, Iterator

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
         "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'1073741824', '512MiB', '2G' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 1073741824, 512MiB or 2GiB, got {text!r}")
    value = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 bytes, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import add_generate_parser
    parser = argparse.ArgumentParser(prog="unmask", description="Inference engine for masked-diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.cli import run_command
    return run_command(build_parser(), argv)


def add_serve_parser(sub: Any) -> None:
    from engine.cli import add_kernel_flag, add_parallel_flags, add_sampling_flags

    from .limits import add_limit_flags
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (default: the bundled model on CPU)",
                       description="OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, "
                                   "/health, /version, /metrics, /docs. The sampling flags set server-wide "
                                   "defaults for fields a request leaves unset.")
    p.add_argument("model_arg", nargs="?", metavar="MODEL",
                   help="checkpoint directory or Hugging Face repo id, e.g. GSAI-ML/LLaDA-8B-Instruct (the local "
                        "Hugging Face cache first, else downloaded; HF_HUB_OFFLINE=1: cache only). Same as --model; "
                        "default: the bundled model")
    p.add_argument("--model", help="the same as the positional MODEL")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start-up)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="name(s) accepted in requests' `model`; the first is reported (default: the model dir)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: the checkpoint's "
                                                   "torch_dtype; on CPU bfloat16 where the CPU supports it)")
    p.add_argument("--device", default=os.environ.get("UNMASK_DEVICE") or "cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: env UNMASK_DEVICE, else cpu)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch at most")
    p.add_argument("--max-queue", type=int, default=1000, help="waiting requests before new ones get 503")
    p.add_argument("--kv-cache-memory", type=parse_bytes, metavar="BYTES",
                   help="KV pool size, e.g. 2GiB (default: 1 GiB on CPU, 90%% of free memory on CUDA)")
    p.add_argument("--api-key", default=os.environ.get("UNMASK_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: env UNMASK_API_KEY; unset: no auth)")
    p.add_argument("--allowed-origins", nargs="*", metavar="ORIGIN",
                   help="CORS origins to allow, e.g. http://localhost:3000 or '*' (default: no CORS)")
    p.add_argument("--max-body-bytes", type=parse_bytes, default=32 << 20, metavar="BYTES",
                   help="largest request body (413 beyond; default 32MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish (default 30)")
    c = p.add_argument_group("connections", "slow, idle and stalled clients are closed; the number of connections "
                                            "is bounded")
    c.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive within this time of the connection opening (or of its "
                        "first byte after a keep-alive pause); else 408 and close. Idle new connections are closed "
                        "after it too (default 10)")
    c.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="most seconds between two reads of a request body (a Content-Length larger than the body "
                        "sent); else 408 and close (default 30)")
    c.add_argument("--send-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a client that reads nothing of its response (or stream) for this long is disconnected "
                        "and its request aborted, like nginx's send_timeout (default 60)")
    c.add_argument("--keep-alive-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds an idle keep-alive connection stays open between requests (default 30)")
    c.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="open connections at most; one more is answered 503 and closed (default 1024)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_kernel_flag(p)
    add_limit_flags(p)
    add_sampling_flags(p)
    add_parallel_flags(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.cli import parallel_options, sampling_fields, sampling_params
    from engine.llm import default_model_dir

    from .config import ServerConfig
    from .connection import ConnectionLimits
    from .engine_client import LocalEngineClient
    from .limits import limits_from_args

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sampling_params(args)  # validate the server-wide defaults now (errors name the flag)
    defaults = {f: getattr(args, f) for f in sampling_fields() if getattr(args, f) is not None}
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
        raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}; pass one")
    model = args.model_arg if args.model_arg is not None else args.model
    name = args.served_model_name or [model.rstrip("/") if model else default_model_dir().name]
    config = ServerConfig(served_model_names=name, api_key=args.api_key, allowed_origins=args.allowed_origins,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          drain_timeout=args.drain_timeout, sampling_defaults=defaults,
                          limits=limits_from_args(args), keep_alive_timeout=args.keep_alive_timeout,
                          connections=ConnectionLimits(args.header_timeout, args.body_timeout, args.send_timeout,
                                                       args.max_connections))
    with _signals_exit_cleanly() as interrupted:
        client = LocalEngineClient.from_model(model, device=args.device, dtype=args.dtype,
                                              max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
                                              kernels=args.kernels,
                                              enable_prefix_caching=args.enable_prefix_caching,
                                              **parallel_options(args))
    if interrupted:
        print(f"unmask serve: {interrupted[0]} while loading the model; exiting", file=sys.stderr, flush=True)
        return 0
    return asyncio.run(serve(client, config, args.host, args.port, args.log_level))


class _Interrupted(BaseException):
    """SIGINT / SIGTERM while the model loads (raised from the signal handler)."""


@contextlib.contextmanager
def _signals_exit_cleanly() -> Iterator[list[str]]:
    """While the body runs (loading the model), SIGINT / SIGTERM stop it: the yielded list then holds the signal's
    name and the exception is swallowed (the caller prints one line and exits 0, no traceback)."""
    got: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        if not got:  # a second signal during the clean-up is ignored
            got.append(signal.Signals(signum).name)
            raise _Interrupted()

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    except _Interrupted:
        pass
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


async def serve(client: Any, config: Any, host: str, port: int, log_level: str = "info") -> int:
    """Run the server until SIGTERM / SIGINT, then drain and stop. Returns the exit status (0)."""
    import uvicorn

    from .app import build_app
    from .connection import guarded_protocol

    app = build_app(client, config)
    serving = app.state.serving
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                           timeout_graceful_shutdown=5, access_log=log_level == "debug",
                                           timeout_keep_alive=config.keep_alive_timeout,
                                           http=guarded_protocol(config.connections)))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign] # we handle the signals
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # second signal: exit now
            force.set()
            server.should_exit = server.force_exit = True
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    server_task = asyncio.create_task(server.serve())
    stop_task = asyncio.create_task(stop.wait())
    announce = asyncio.create_task(_announce(server, client, config))
    await asyncio.wait({server_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    announce.cancel()
    if server_task.done():  # failed to start (port in use, ...)
        await client.shutdown()
        server_task.result()
        return 1 if not server.started else 0
    serving.draining = True
    print(f"unmask serve: shutting down; {serving.inflight} request(s) in flight, waiting up to "
          f"{config.drain_timeout:g} s (Ctrl-C again: exit now)", file=sys.stderr, flush=True)
    if not await _first(serving.wait_idle(config.drain_timeout), force.wait()):
        print(f"unmask serve: aborting {serving.inflight} unfinished request(s)", file=sys.stderr, flush=True)
    await client.shutdown()
    # aborted requests send their errors (a forced exit gives them a moment, not the drain)
    await _first(serving.wait_idle(5.0), force.wait()) if not force.is_set() else await serving.wait_idle(1.0)
    tasks = set(server.server_state.tasks)
    if tasks:  # responses still being written: their final bytes
        await asyncio.wait(tasks, timeout=1.0 if force.is_set() else 5.0)
    _abandon(server, every=force.is_set())  # responses whose clients stopped reading (or all, when forced)
    await asyncio.sleep(0)  # let the abandoned apps see their disconnect
    server.should_exit = True
    await server_task
    stop_task.cancel()
    print("unmask serve: stopped", file=sys.stderr, flush=True)
    return 0


async def _first(*aws: Any) -> bool:
    """Wait for the first of these awaitables; True if it was the first one and it returned truthy."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    return tasks[0] in done and bool(tasks[0].result())


def _abandon(server: Any, every: bool = False) -> None:
    """Close the connections whose response is blocked on a client that does not read (their send buffers are
    full; every connection with every=True): waiting for them would hold the shutdown for the whole graceful
    timeout and end in cancelled tasks. Their apps see a disconnect and end cleanly."""
    from .connection import GuardedH11Protocol
    for conn in list(server.server_state.connections):
        if isinstance(conn, GuardedH11Protocol) and conn.flow is not None and (every or conn.flow.write_paused):
            conn.abandon()


async def _announce(server: Any, client: Any, config: Any) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    info = client.info
    for s in server.servers:
        for sock in s.sockets:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"unmask serve: model {config.model_name!r} (family {info.family}, {info.dtype} on {info.device}, "
                  f"context {info.max_model_len}) from {info.path}", flush=True)
            auth = "; API key required" if config.api_key else ""
            print(f"unmask serve: listening on http://{shown}:{port} (docs at /docs, playground at /){auth}",
                  flush=True)
            return


if __name__ == "__main__":
    sys.exit(main())
