"""``flexspeed serve``: an OpenAI-compatible HTTP server for a model folder.

``/v1/completions``, ``/v1/chat/completions`` (both streaming by server-sent events),
``/v1/models``, ``/health`` and ``/metrics`` (Prometheus), on Starlette and uvicorn (the
``serve`` extra). Requests are batched continuously for GPT-2, OPT and Llama in memory and
statically otherwise (offloaded models, other families); see ``docs/serve.md``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time

from flexspeed.cli.textargs import (add_engine_arguments, add_model_arguments, add_offload_arguments,
                                    add_text_arguments, check_positive)

__all__ = ["add_parser", "run"]

_EPILOG = """\
examples:
  flexspeed serve --model /models/llama --port 8000
  flexspeed serve --model /models/opt-1.3b --percent 30 70 100 0 100 0 --gpu-batch-size 8
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Hello", "max_tokens": 16, "temperature": 0}'

Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").
"""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_text_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: --model as given)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    add_engine_arguments(p.add_argument_group("batching"), serving=True)
    add_offload_arguments(p.add_argument_group("offload (FlexLLMGen's policy)"))
    return p


def _missing_extra() -> str | None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return (f"flexspeed serve needs the 'serve' extra ({exc.name} is not installed): "
                "pip install 'flexspeed[serve]'")
    return None


def _port_free(host: str, port: int) -> str | None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host"
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(message: str) -> int:
    print(f"flexspeed serve: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    missing = _missing_extra()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    bad = check_positive(args, ("port", "max_num_seqs", "max_queue", "max_model_len", "cache_len", "gpu_batch_size",
                                "num_gpu_batches", "max_batch", "threads"))
    if bad:
        return _fail(bad)
    busy = _port_free(args.host, args.port)
    if busy:
        return _fail(busy)
    import torch
    import uvicorn

    from flexspeed.cli.textargs import engine_options, load_model, offload_policy
    from flexspeed.config.errors import ConfigError
    from flexspeed.serve.app import build_app
    from flexspeed.serve.engine import Engine
    from flexspeed.serve.model import check_model_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        check_model_folder(args.model)
        length = args.max_model_len or 2048
        policy, origin = offload_policy(args, max(1, length * 3 // 4), max(1, length // 4), args.max_num_seqs)
        if policy is not None:
            print(f"{origin}: {policy.describe()}", flush=True)
        model, tokenizer = load_model(args, policy)
        engine = Engine(model, tokenizer, engine_options(args, policy, args.max_queue)).start()
    except (ConfigError, ValueError, NotImplementedError) as exc:
        return _fail(str(exc))
    name = args.served_model_name or args.model
    print(f"loaded {model.describe()} in {time.perf_counter() - t0:.1f}s; {engine.describe()}", flush=True)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (health /health, metrics /metrics)", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, name), host=args.host, port=args.port,
                                           log_level=args.log_level, lifespan="off"))
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again with the handler it found: make
    # SIGTERM's like Ctrl-C's, so the engine (and an offload runner's files) are closed either way
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
        if model.offloaded:
            model.engine.offload.close()
    return 0
