"""`python -m demo`: serve the chat-and-draw page for one TokenFlowMLLM checkpoint.

Start-up order: check the model folder (exit at once with what it lacks), make the one temporary folder every
file of the session goes to, load the model, warm it up (printing time to first token and to a full drawing),
then serve until Ctrl-C or SIGTERM, and remove the temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import time

from unimodal.cli import run_main

from .checkpoint import BUNDLED_MODEL, HOW_TO_GET_A_MODEL, CheckpointError, check_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                     epilog=HOW_TO_GET_A_MODEL, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_MODEL),
                        help="checkpoint folder (TokenFlowMLLM.save_pretrained); default: the bundled ShapesWorld "
                             "model demo/shapesworld-tiny")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public *.gradio.live link (anyone with the link can use the model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default auto: CUDA when available)")
    parser.add_argument("--max-concurrency", type=int, default=1,
                        help="turns that run at once; the others wait in the queue (default 1)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait in the queue; more are refused (default 64)")
    args = parser.parse_args(argv)
    for name in ("max_concurrency", "max_queue"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    try:
        directory = check_checkpoint(args.model)
    except CheckpointError as error:
        raise CheckpointError(f"{error}\n\n{HOW_TO_GET_A_MODEL}\n") from error
    # Imported only after the folder check (torch, transformers and gradio take seconds to import), and after
    # GRADIO_TEMP_DIR is set below (gradio fixes its upload folder when it is imported).
    from .model import describe, load_model, resolve_device, warm_up
    from .session import Limits

    device = resolve_device(args.device)
    if args.share:
        print("warning: --share makes the page reachable by anyone who has its public link; they can run the model "
              "on this machine and upload files to it", flush=True)

    # SIGTERM ends the server like Ctrl-C does, so the temporary folder is removed on either.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="tokenflow-demo-") as temporary:
        print(f"temporary files: {temporary}", flush=True)
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(temporary, "gradio")
        from .app import build_app

        print(f"loading {directory} on {device} …", flush=True)
        model = load_model(directory, device)
        card = describe(model, directory, device)
        print(f"loaded {card.name}: tokenizer {card.tokenizer_preset}, {card.parameters:,} parameters, {device}",
              flush=True)
        timings = warm_up(model)
        print(f"warm-up: time to first token {timings['time_to_first_token_s']:.2f} s, "
              f"time to a full drawing {timings['time_to_drawing_s']:.2f} s", flush=True)
        drawings = os.path.join(temporary, "drawings")
        os.makedirs(drawings)
        limits = Limits()
        app = build_app(model, card, drawings, limits)
        app.queue(default_concurrency_limit=args.max_concurrency, max_size=args.max_queue)
        app.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[temporary],
                   max_file_size=limits.max_upload_bytes, show_error=True, prevent_thread_lock=True)
        try:
            while app.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("closing the server …", flush=True)
        finally:
            app.close()  # stops the queue and the heartbeats first, so the server shuts down at once


if __name__ == "__main__":
    run_main(main)
