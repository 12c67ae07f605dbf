"""Files and processes for failure-injection tests: odd and broken images, a hostile checkpoint, the
training command line of a tiny run and ways to stop it from outside."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
HUGE = (12000, 9000)


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _exif_rotated(path: Path) -> None:
    image = _noise((40, 24), 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, format="JPEG", exif=exif.tobytes())


def _animated_gif(path: Path) -> None:
    frames = [Image.new("P", (32, 32), colour) for colour in (10, 120, 250)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


ODD_IMAGES: dict[str, Callable[[Path], None]] = {
    "rgba.png": lambda p: Image.new("RGBA", (30, 20), (200, 10, 10, 90)).save(p),
    "palette.png": lambda p: _noise((30, 20), 2).convert("P", palette=Image.Palette.ADAPTIVE).save(p),
    "cmyk.jpg": lambda p: _noise((30, 20), 3).convert("CMYK").save(p, format="JPEG"),
    "sixteen_bit.png": lambda p: Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(p),
    "one_pixel.png": lambda p: Image.new("RGB", (1, 1), (0, 255, 0)).save(p),
    "huge_12000x9000.jpg": lambda p: Image.new("RGB", HUGE, (30, 60, 90)).save(p, quality=50),
    "exif_rotated.jpg": _exif_rotated,
    "animated.gif": _animated_gif,
    "photo.webp": lambda p: _noise((30, 20), 4).save(p, format="WEBP"),
    "scan.tif": lambda p: _noise((30, 20), 5).save(p, format="TIFF"),
    "bitmap.bmp": lambda p: _noise((30, 20), 6).save(p, format="BMP"),
    "café 東京 №7.jpg": lambda p: _noise((30, 20), 7).save(p, format="JPEG"),
    "Nested/DEEPER/UPPER.JPEG": lambda p: _noise((30, 20), 8).save(p, format="JPEG"),
    "Nested/Shout.PNG": lambda p: _noise((30, 20), 9).save(p, format="PNG"),
}


def _truncated(path: Path) -> None:
    buffer = io.BytesIO()
    _noise((64, 48), 10).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[:600])


def _absurd_png(path: Path) -> None:
    """A valid 1x1 PNG whose header claims 100000 x 100000 pixels (a decompression bomb's shape)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the chunk's CRC over type and data
    path.write_bytes(bytes(data))


# name -> (maker, the kind ImageLoadError reports)
BROKEN_IMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated.jpg": (_truncated, "corrupt or truncated"),
    "text.png": (lambda p: p.write_text("this is not an image\n"), "not an image"),
    "empty.jpeg": (lambda p: p.write_bytes(b""), "empty"),
    "absurd.png": (_absurd_png, "too large"),
}


def make_images(root: Path, names: dict[str, Callable[[Path], None]]) -> list[Path]:
    paths = []
    for name, make in names.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        paths.append(path)
    return paths


class _Exploit:
    """Pickles as a call to os.system: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_hostile_checkpoint(source: Path, target: Path, marker: Path) -> None:
    """A copy of a real captioner checkpoint with a code-running object slipped into its config."""
    payload = torch.load(source, weights_only=True)
    payload["config"]["note"] = _Exploit(marker)
    torch.save(payload, target)


def subprocess_env(**extra: str) -> dict[str, str]:
    """One thread (runs are deterministic for a fixed thread count), no hub access."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    """The training CLI on the tiny generated data set: 2 epochs of 4 steps, last.pt after every step."""
    return [
        sys.executable, str(REPO / "train_scst.py"),
        "--encoder.vision_config", "swin_demo", "--encoder.checkpoint", "none",
        "--model.gpt2_config", "{n_layer: 2, n_embd: 64, n_head: 2}",
        "--data.image_root", str(data), "--data.train_file", str(data / "train.json"),
        "--data.val_file", str(data / "val.json"), "--data.test_file", str(data / "test.json"),
        "--cider_df", "none", "--augment=False", "--device", "cpu", "--lr", "1e-3", "--log_every", "1",
        "--batch_size", "8", "--eval_batch_size", "8", "--max_len", "8", "--min_len", "1",
        "--epochs", "2", "--max_steps_per_epoch", "4", "--save_every_steps", "1", "--val_meteor", "false",
        "--output_dir", str(out), *extra,
    ]  # fmt: skip


class Job:
    """A training process in its own process group (as a scheduler sees a job), logging to files."""

    def __init__(self, command: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:  # fmt: skip
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, env=env or subprocess_env(), start_new_session=True,
                preexec_fn=preexec_fn,
            )  # fmt: skip

    def signal_group(self, sig: int) -> None:
        """Signal every process of the job (a no-op once it has ended)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout=timeout)

    def error_text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300, poll: float = 0.005) -> bool:
        """Poll ``condition`` until it holds (True) or the process ends first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(poll)
        raise TimeoutError("condition not met in time")


def limit_file_size(max_bytes: int) -> Callable[[], None]:
    """``preexec_fn`` for a real "disk full": writes beyond ``max_bytes`` fail with EFBIG (SIGXFSZ ignored
    so that the write returns the error instead of killing the process)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply
