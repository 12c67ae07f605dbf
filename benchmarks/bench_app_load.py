"""The web page under load: ``python app.py`` with a tiny random model, called by concurrent ``gradio_client``
clients, each request carrying several real photos and now and then a broken file.

    python benchmarks/bench_app_load.py [--requests 40] [--clients 8] [--photos 4] [--queue 8] [--queue 2]

For each ``--queue`` size (the app's ``--queue``: requests that may wait while one is captioned) it reports the
latency percentiles of the answered requests, the share answered, the share told the server is busy (Gradio's
"Queue is full" answer), requests that failed any other way (must be 0: none is dropped silently), the
server's resident memory before and after, whether every good photo got a caption and every broken file its
message, and that the server still answers afterwards. Needs ``pip install -r requirements-app.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from engine.config import build_config  # noqa: E402
from models.build import architecture, build_captioner  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.config import to_dict  # noqa: E402

SHARED = Path(os.environ.get("OPG_SHARED_DIR", REPO_ROOT.parent / "shared"))
REAL_IMAGES = SHARED / "real_images"
START_TIMEOUT_S = 300
BROKEN_EVERY = 3  # every third request carries one broken file in place of a photo


def tiny_checkpoint(path: Path) -> Path:
    """A random CPU-sized model (demo Swin, 2-layer GPT-2, sparse mask) saved as training saves one."""
    torch.manual_seed(0)
    cfg = build_config([], {
        "encoder.vision_config": "swin_demo", "model.gpt2_config": {"n_layer": 2, "n_embd": 64, "n_head": 2},
        "decode.beams": 2, "decode.max_len": 12, "decode.min_len": 1, "device": "cpu",
    })  # fmt: skip
    model = build_captioner(cfg)
    save_checkpoint(path, model, to_dict(cfg), architecture(model))
    return path


def broken_files(folder: Path, photo: Path) -> list[Path]:
    """A photo cut off halfway and a text file posing as a JPEG."""
    cut = folder / "cut_off.jpg"
    data = photo.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    text = folder / "notes.jpg"
    text.write_text("these are not pixels\n")
    return [cut, text]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_app(checkpoint: Path, queue: int) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on a free port; its process and URL once it serves."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu",
               "--queue", str(queue)]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if " open http://" in line and not found:
                found.append(line.split(" open ", 1)[1].split()[0])

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("app.py did not start:\n" + "".join(lines))
        time.sleep(0.2)
    return process, found[0]


def plan(requests: int, photos_per_request: int, photos: list[Path], broken: list[Path]) -> list[list[Path]]:
    """The files of each request: real photos in turn, one of them replaced by a broken file every
    ``BROKEN_EVERY`` requests."""
    jobs = []
    for i in range(requests):
        files = [photos[(i * photos_per_request + j) % len(photos)] for j in range(photos_per_request)]
        if i % BROKEN_EVERY == 0:
            files[i % photos_per_request] = broken[(i // BROKEN_EVERY) % len(broken)]
        jobs.append(files)
    return jobs


def run_load(url: str, jobs: list[list[Path]], clients: int, broken: set[Path]) -> dict[str, Any]:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    local = threading.local()
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def send(files: list[Path]) -> None:
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        start = time.perf_counter()
        outcome: dict[str, Any] = {"files": files}
        try:
            *_, results = local.client.predict(
                [handle_file(str(f)) for f in files], "beam", 2, 1, 1.0, 1.0, None, api_name="/caption"
            )
            outcome.update(kind="answered", results=results)
        except QueueError as err:
            outcome.update(kind="busy", message=str(err))
        except AppError as err:
            outcome.update(kind="busy" if "queue is full" in str(err).lower() else "failed", message=str(err))
        except Exception as err:  # anything else is a request lost: reported, never hidden
            outcome.update(kind="failed", message=f"{type(err).__name__}: {err}")
        outcome["seconds"] = time.perf_counter() - start
        with lock:
            outcomes.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, jobs))
    wall = time.perf_counter() - start

    answered = [o for o in outcomes if o["kind"] == "answered"]
    good_captioned = good_total = broken_reported = broken_total = 0
    for outcome in answered:
        for path, result in zip(outcome["files"], outcome["results"], strict=True):
            if path in broken:
                broken_total += 1
                broken_reported += "error" in result and result["error"].startswith(path.name)
            else:
                good_total += 1
                good_captioned += bool(result.get("captions")) and bool(result["captions"][0]["text"].strip())
    latencies = sorted(o["seconds"] for o in answered)
    busy = [o for o in outcomes if o["kind"] == "busy"]
    failed = [o for o in outcomes if o["kind"] == "failed"]
    return {
        "requests": len(jobs),
        "answered": len(answered),
        "busy": len(busy),
        "failed": len(failed),
        "busy_message": busy[0]["message"] if busy else None,
        "failures": [o["message"] for o in failed],
        "wall_s": round(wall, 1),
        "latency_s": percentiles(latencies),
        "good_photos_captioned": f"{good_captioned}/{good_total}",
        "broken_files_reported": f"{broken_reported}/{broken_total}",
    }


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": round(cuts[49], 2), "p90": round(cuts[89], 2), "p99": round(cuts[98], 2),
            "max": round(values[-1], 2)}  # fmt: skip


def still_serves(url: str, photo: Path) -> bool:
    from gradio_client import Client, handle_file

    *_, results = Client(url, verbose=False).predict(
        [handle_file(str(photo))], "greedy", 1, 1, 1.0, 1.0, None, api_name="/caption"
    )
    return bool(results[0].get("captions"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--photos", type=int, default=4, help="files per request")
    parser.add_argument("--queue", type=int, action="append", help="app.py --queue sizes to try (default 8 and 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    photos = sorted(REAL_IMAGES.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos in {REAL_IMAGES} (set OPG_SHARED_DIR)")
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gradio": _version("gradio"),
            "gradio_client": _version("gradio_client"),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = tiny_checkpoint(folder / "tiny.pt")
        broken = broken_files(folder, photos[0])
        jobs = plan(args.requests, args.photos, photos, broken)
        for queue in args.queue or [8, 2]:
            process, url = start_app(checkpoint, queue)
            try:
                still_serves(url, photos[0])  # first request: warms the model up before measuring
                before = rss_mib(process.pid)
                run = {"queue": queue, "clients": args.clients, "photos_per_request": args.photos}
                run.update(run_load(url, jobs, args.clients, set(broken)))
                run["rss_mib"] = {"before": round(before, 1), "after": round(rss_mib(process.pid), 1)}
                run["serves_afterwards"] = process.poll() is None and still_serves(url, photos[0])
            finally:
                process.terminate()
                process.wait(timeout=60)
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = all(r["failed"] == 0 and r["serves_afterwards"] for r in report["runs"])
    return 0 if ok else 1


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
