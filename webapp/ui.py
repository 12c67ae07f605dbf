"""The Gradio page: photos or bundled examples in, decoding settings, captions with scores, the sparse mask
tab and the model's description. Offline by construction: analytics and the version check are off and the
theme uses the system's fonts, so the page requests nothing from other hosts."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no phoning home

import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402

from webapp.render import captions_html, mask_html  # noqa: E402
from webapp.service import MAX_BEAMS, MAX_CAPTIONS, CaptionService, RequestError, Settings  # noqa: E402
from webapp.uploads import sweep_failed_uploads  # noqa: E402

logger = logging.getLogger(__name__)

FAILED_UPLOAD_MAX_AGE_S = 600.0
API_NAME = "caption"  # gradio_client: Client(url).predict(files, method, ..., api_name="/caption")
SYSTEM_FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
CSS = """
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px; width: 330px; }
.card h4 { margin: 0 0 6px; overflow-wrap: anywhere; }
.card img { max-width: 160px; max-height: 160px; border-radius: 4px; }
.card ol { padding-left: 20px; margin: 6px 0 0; }
.score { color: var(--body-text-color-subdued); font-family: var(--font-mono); font-size: 0.85em; }
.error { color: var(--error-text-color, #b91c1c); }
.masked { width: 224px; height: 224px; background-size: cover; }
.grid { display: grid; width: 100%; height: 100%; }
.cell { outline: 1px solid rgba(255, 255, 255, 0.6); }
.cell.dropped { background: rgba(20, 20, 20, 0.7); }
.badge { padding: 0 6px; border-radius: 4px; }
.badge.kept { background: #dcfce7; color: #14532d; }
.badge.dropped { background: #e5e7eb; color: #111827; }
"""
METHOD_CHOICES = [("greedy", "greedy"), ("beam search", "beam"), ("sampling", "sample")]


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts instead of web fonts (which it would fetch)."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def model_description(info: dict[str, Any]) -> str:
    """The model panel's Markdown."""
    grid = f"{info['grid']} x {info['grid']} grid + mean token" if info["grid"] else "learned queries"
    mask = "yes" if info["sparse_mask"] else "no"
    return (f"**Model** `{info['checkpoint']}` on {info['device']} ({info['precision']}); prefix of "
            f"{info['prefix_length']} positions ({grid}); sparse mask: {mask}; images resized to "
            f"{info['image_size']} px; saved beam size {info['default_beams']}; at most {info['max_images']} "
            "images per request.")  # fmt: skip


def caption_handler(service: CaptionService):
    """The page's and the API's one function: files and settings -> message, captions, mask, JSON."""
    info = service.info()

    def caption(
        files: list[str] | None, method: str, beams: float, num_captions: float, temperature: float,
        top_p: float, seed: float | None,
    ) -> tuple[str, str, str, list[dict[str, Any]]]:  # fmt: skip
        try:
            settings = Settings(
                method, beams=_whole(beams), num_captions=_whole(num_captions), temperature=float(temperature),
                top_p=float(top_p), seed=None if seed is None or seed == "" else _whole(seed),
            )  # fmt: skip
            results = service.caption(files or [], settings)
        except RequestError as err:
            raise gr.Error(str(err), print_exception=False) from None
        failed = sum(result.error is not None for result in results)
        message = (
            f"{failed} of {len(results)} {'file' if len(results) == 1 else 'files'} could not be read: see below."
            if failed
            else ""
        )
        return (message, captions_html(results), mask_html(results, info["grid"], info["image_size"]),
                [result.to_json() for result in results])  # fmt: skip

    return caption


def _whole(value: float | str) -> int | float:
    """Numbers arrive as floats from sliders and scripts; a whole one becomes an int, others fail the check."""
    number = float(value)
    return int(number) if number.is_integer() else number


def build_demo(service: CaptionService, examples_dir: Path | None = None) -> gr.Blocks:
    """The captioning page over ``service``; the bundled example photos of ``examples_dir`` if any."""
    info = service.info()
    defaults = service.default_settings()
    with gr.Blocks(title="OPG captioning", analytics_enabled=False) as demo:
        gr.Markdown("# OPG image captioning\nChoose or drop photos, pick a decoding method, press **Caption**.")
        gr.Markdown(model_description(info), elem_id="model")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Photos", file_count="multiple", elem_id="files")
                method = gr.Radio(METHOD_CHOICES, value=defaults.method, label="Decoding", elem_id="method")
                beams = gr.Slider(1, MAX_BEAMS, value=defaults.beams, step=1, label="Beam size", elem_id="beams",
                                  visible=defaults.method == "beam")  # fmt: skip
                num_captions = gr.Slider(1, MAX_CAPTIONS, value=1, step=1, label="Captions per image",
                                         elem_id="num-captions", visible=defaults.method != "greedy")  # fmt: skip
                temperature = gr.Slider(0.01, 10.0, value=1.0, step=0.01, label="Temperature", visible=False,
                                        elem_id="temperature")  # fmt: skip
                top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="Top-p", visible=False, elem_id="top-p")
                seed = gr.Number(None, label="Seed (empty: random)", precision=0, minimum=0, visible=False,
                                 elem_id="seed")  # fmt: skip
                button = gr.Button("Caption", variant="primary", elem_id="caption")
                if examples_dir is not None and any(examples_dir.glob("*.jpg")):
                    paths = sorted(str(p) for p in examples_dir.glob("*.jpg"))
                    gr.Examples([[paths]] + [[[p]] for p in paths], inputs=[files], label="Examples",
                                example_labels=["all examples"] + [Path(p).name for p in paths])  # fmt: skip
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                with gr.Tabs():
                    with gr.Tab("Captions", id="captions-tab"):
                        captions = gr.HTML(elem_id="captions")
                    with gr.Tab("Sparse mask", id="mask-tab"):
                        gr.Markdown("Which prefix positions the mask lets GPT-2 read: the image as the encoder "
                                    "sees it under its grid, dropped cells shaded.")  # fmt: skip
                        mask = gr.HTML(elem_id="mask")
                results = gr.JSON(label="Results (JSON)", visible=False)

        def show_settings(choice: str) -> tuple[dict, dict, dict, dict, dict]:
            sampling = choice == "sample"
            return (gr.update(visible=choice == "beam"), gr.update(visible=choice != "greedy", value=1),
                    gr.update(visible=sampling), gr.update(visible=sampling), gr.update(visible=sampling))  # fmt: skip

        method.change(show_settings, method, [beams, num_captions, temperature, top_p, seed], api_visibility="private")
        button.click(caption_handler(service), [files, method, beams, num_captions, temperature, top_p, seed],
                     [message, captions, mask, results], api_name=API_NAME)  # fmt: skip
    return demo


def free_port(host: str) -> int:
    """A port nobody listens on now (for --port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(
    service: CaptionService, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
    max_upload_mb: float = 20.0, queue: int = 8, examples_dir: Path | None = None,
    failed_upload_age_s: float = FAILED_UPLOAD_MAX_AGE_S,
) -> None:  # fmt: skip
    """Serve the page until Ctrl+C or SIGTERM. Requests are captioned one at a time (they share one model
    and torch already uses every core); up to ``queue`` more wait, later ones are told the server is busy.
    What cut-off or refused uploads leave in Gradio's upload folder is deleted once untouched for
    ``failed_upload_age_s`` (10 minutes by default)."""
    demo = build_demo(service, examples_dir)
    demo.queue(max_size=queue, default_concurrency_limit=1)
    port = free_port(host) if port == 0 else port
    _, url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, max_file_size=int(max_upload_mb * 1e6), quiet=True,
        prevent_thread_lock=True, theme=theme(), css=CSS, ssr_mode=False, footer_links=["api"], show_error=True,
        allowed_paths=[str(examples_dir)] if examples_dir is not None else None,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    shown = f"http://{host}:{port}/"
    extra = f" and {share_url}" if share_url else ""
    print(f"Captioning with {service.source} on {service.captioner.device}: open {shown}{extra} (Ctrl+C stops)",
          flush=True)  # fmt: skip
    stop_sweeping = threading.Event()
    sweep_failed_uploads(Path(get_upload_folder()), failed_upload_age_s, stop_sweeping)
    try:
        demo.block_thread()
    finally:
        stop_sweeping.set()
        demo.close()
    print("stopped", flush=True)
