"""Caption photos in a browser: a Gradio page over the Python API (``models.load_captioner``).

    python app.py [--checkpoint CKPT_OR_FOLDER_OR_HUB_ID] [--host 127.0.0.1] [--port 7860] [--share]
                  [--device auto] [--precision auto] [--max_images 16] [--max_upload_mb 20] [--queue 8]
                  [--failed_upload_age_s 600]

Upload photos or pick the bundled examples, choose greedy, beam search or sampling and the number of
captions, and read the captions with their scores; a second tab shows which prefix positions the sparse mask
kept. Without --checkpoint the demo's model (runs/demo/, made by ``python demo.py``) is used. Needs
``pip install -r requirements-app.txt`` (Gradio). Nothing is fetched from other hosts unless --share asks
for a public link. Scripts call it with ``gradio_client`` (``api_name="/caption"``). Stop it with Ctrl+C.
Exit status 2 when there is no usable model, the address is taken or Gradio is missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from utils.cli import ArgumentParser, add_flag
from utils.precision import PRECISIONS

ROOT = Path(__file__).resolve().parent
DEMO_RUNS = ROOT / "runs" / "demo"
EXAMPLES = ROOT / "assets" / "examples"
DEMO_STAGES = ("scst_mean", "scst_greedy", "xe")  # best first: demo.py's output folders


def default_checkpoint(runs: Path | None = None) -> Path | None:
    """The demo's best trained model in ``runs`` (default runs/demo): SCST (mean, then greedy baseline),
    else XE; None when there is none."""
    runs = DEMO_RUNS if runs is None else runs
    return next((runs / stage / "best.pt" for stage in DEMO_STAGES if (runs / stage / "best.pt").is_file()), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="training .pt, exported folder or Hub id (default: the demo's model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (0: any free one; the URL is printed)")
    add_flag(parser, "--share", "also publish a temporary public link through Gradio's share servers")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: the run's own train.precision")
    parser.add_argument("--max_images", type=int, default=16, help="images per request")
    parser.add_argument("--max_upload_mb", type=float, default=20.0, help="size of one uploaded file")
    parser.add_argument("--queue", type=int, default=8, help="requests that may wait while one is captioned")
    parser.add_argument("--failed_upload_age_s", type=float, default=600.0,
                        help="delete what a cut-off or refused upload left once untouched this long")  # fmt: skip
    args = parser.parse(argv)
    if not isinstance(args, int) and (
        args.max_images < 1 or args.max_upload_mb <= 0 or args.queue < 0 or args.failed_upload_age_s <= 0
    ):
        print("app.py: error: --max_images must be >= 1, --max_upload_mb > 0, --queue >= 0 and "
              "--failed_upload_age_s > 0", file=sys.stderr)  # fmt: skip
        return 2
    return args


def no_model_message() -> str:
    looked = ", ".join(f"{stage}/best.pt" for stage in DEMO_STAGES)
    return (f"error: no --checkpoint given and no demo model in {DEMO_RUNS} (looked for {looked}).\n"
            "Train the demo's model first (about 10 minutes on 2 CPU cores):  python demo.py\n"
            "or pass a model:  python app.py --checkpoint runs/xe/best.pt")  # fmt: skip


def _shown(source: str | Path) -> str:
    """The model's name on the page: relative to the working folder when it is inside it."""
    path = Path(source).expanduser().resolve()
    return str(path.relative_to(Path.cwd())) if path.exists() and path.is_relative_to(Path.cwd()) else str(source)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes of the page
    source = args.checkpoint or default_checkpoint()
    if source is None:
        print(no_model_message(), file=sys.stderr)
        return 2
    if Path(source).expanduser().exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model needs no network: not even a probe
    try:
        from webapp.ui import serve
    except ImportError as err:
        print(f"error: the web page needs Gradio ({err}): pip install -r requirements-app.txt", file=sys.stderr)
        return 2
    from models import load_captioner
    from utils.checkpoint import CheckpointError
    from webapp.service import CaptionService

    try:
        captioner = load_captioner(source, device=args.device, precision=args.precision)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: cannot load the model {source}: {err}", file=sys.stderr)
        return 2
    if not _port_free(args.host, args.port):
        print(f"error: cannot listen on {args.host}:{args.port}: the address is in use", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("app").warning("listening on %s: whoever reaches this machine can use the page", args.host)
    service = CaptionService(captioner, _shown(source), args.max_images)
    serve(service, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb,
          queue=args.queue, examples_dir=EXAMPLES, failed_upload_age_s=args.failed_upload_age_s)  # fmt: skip
    return 0


def _port_free(host: str, port: int) -> bool:
    if port == 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
