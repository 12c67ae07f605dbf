"""Swin image-encoder weights from X-VLM, Microsoft Swin and timm checkpoint files.

Accepted files (all read with ``torch.load(weights_only=True)``):

- X-VLM pretrain / fine-tuned: ``{'model': sd, 'config': {...}}`` or a bare ``sd`` with the encoder under
  ``vision_encoder.*`` next to text and head weights; an optional DDP ``module.`` prefix is removed.
- The flat ``swin_pretrain.th``: the ``vision_encoder.*`` entries with the prefix stripped.
- Microsoft Swin (``{'model': sd}``) and timm state dicts; ``head.*`` (the ImageNet classifier) is dropped.

X-VLM and Microsoft Swin merge patches at the end of stages 0..2; timm (>= 0.9) at the start of stages
1..3, so ``layers.{i}.downsample.*`` becomes ``layers.{i+1}.downsample.*``. The buffers
``relative_position_index`` and ``attn_mask`` are recomputed by the model and so dropped. Everything else
must fit the model exactly.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

XVLM_PREFIX = "vision_encoder."
_DDP_PREFIX = "module."
_RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_TABLE_SUFFIX = "attn.relative_position_bias_table"
_MAX_LISTED = 10


class CheckpointFormatError(ValueError):
    """The file is not a readable checkpoint holding Swin image-encoder weights."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's encoder weights do not fit the model (missing, unexpected or mis-shaped keys)."""

    def __init__(
        self,
        path: Path,
        model_desc: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.path, self.missing, self.unexpected, self.mismatched = path, missing, unexpected, mismatched
        lines = [f"encoder checkpoint {path} does not fit the Swin encoder ({model_desc}):"]
        if missing:
            lines.append(_listing("missing", missing))
        if unexpected:
            lines.append(_listing("unexpected", unexpected))
        if mismatched:
            shapes = [f"{key} (file {list(got)}, model {list(want)})" for key, got, want in mismatched]
            lines.append(_listing("shape mismatch", shapes))
        super().__init__("\n".join(lines))


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {shown}{more}"


@dataclass
class SwinWeights:
    """Encoder tensors read from one file, already renamed to timm's ``SwinTransformer`` keys."""

    path: Path
    tensors: dict[str, torch.Tensor]
    prefix: str  # stripped from the file's keys ("vision_encoder.", "module.vision_encoder." or "")
    merge_at_stage_end: bool  # the file uses X-VLM / Microsoft patch-merging placement
    config_image_res: int | None  # image_res of an X-VLM wrapper's 'config', if any
    mask_windows: int | None  # window count of the stage-0 shifted-window attn_mask buffer, if stored

    def file_key(self, model_key: str) -> str:
        """The name a timm key had in the file (for error messages)."""
        if self.merge_at_stage_end:
            model_key = _MERGE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", model_key)
        return self.prefix + model_key


def read_swin_checkpoint(path: str | os.PathLike) -> SwinWeights:
    """Read the Swin encoder weights of ``path`` in any accepted layout (see the module docstring)."""
    path = Path(path)
    state, config = _unwrap(_load_file(path), path)
    prefix = _encoder_prefix(state, path)
    stage_end_key = f"{prefix}layers.0.downsample.reduction.weight"
    merge_at_stage_end = prefix.endswith(XVLM_PREFIX) or stage_end_key in state
    tensors: dict[str, torch.Tensor] = {}
    mask_windows = None
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise CheckpointFormatError(f"{path}: entry {prefix + key!r} is a {kind}, not a tensor")
        if key == "layers.0.blocks.1.attn_mask":
            mask_windows = value.shape[0]
        if key.startswith("head.") or key.rsplit(".", 1)[-1] in _RECOMPUTED_BUFFERS:
            continue
        if merge_at_stage_end:
            key = _MERGE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        tensors[key] = value
    image_res = config.get("image_res") if isinstance(config, Mapping) else None
    return SwinWeights(
        path=path,
        tensors=tensors,
        prefix=prefix,
        merge_at_stage_end=merge_at_stage_end,
        config_image_res=image_res if isinstance(image_res, int) else None,
        mask_windows=mask_windows,
    )


def _load_file(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"{path}: the file is empty, not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises KeyError, EOFError, RuntimeError, ... for non-checkpoints
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise _unreadable(path, err) from err
    return _load_allow_listed(path, unsafe)


def _load_allow_listed(path: Path, unsafe: list[str]) -> object:
    """Retry a weights-only load that met pickled objects, if each is a plain-data type on the allow-list.

    X-VLM saves its training config next to the weights; argparse namespaces and numpy scalars are what such
    configs may hold. Anything else is refused rather than unpickled.
    """
    allowed = _allowed_globals()
    refused = [name for name in unsafe if name not in allowed]
    if refused:
        raise CheckpointFormatError(
            f"{path}: the checkpoint pickles objects that cannot be loaded safely: {', '.join(refused)}. "
            "If you trust the file, re-save its state dict with plain tensors, e.g. "
            "torch.save(torch.load(path, weights_only=False)['model'], new_path)"
        )
    logger.info("%s: loading with allow-listed non-tensor objects: %s", path, ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals([(allowed[name], name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> CheckpointFormatError:
    detail = type(err).__name__
    if str(err).strip():
        detail += f": {str(err).strip().splitlines()[0]}"
    return CheckpointFormatError(
        f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another kind of file; {detail})"
    )


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the original load error is the one to report
        return []


def _allowed_globals() -> dict[str, object]:
    """Plain-data classes a weights-only load may build: names as pickled by numpy 1.x and 2.x."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: dict[str, object] = {
        "argparse.Namespace": argparse.Namespace,
        "numpy.dtype": np.dtype,
        "numpy.core.multiarray.scalar": scalar,
        "numpy._core.multiarray.scalar": scalar,
    }
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return allowed


def _unwrap(obj: object, path: Path) -> tuple[Mapping[str, object], object]:
    """The state dict inside a checkpoint (``model`` / ``state_dict`` wrapper or bare) and its config."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    config = obj.get("config")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            return obj[wrapper], config
    return obj, config


def _encoder_prefix(state: Mapping[str, object], path: Path) -> str:
    for ddp in ("", _DDP_PREFIX):
        if any(str(key).startswith(ddp + XVLM_PREFIX) for key in state):
            return ddp + XVLM_PREFIX
        if ddp + "patch_embed.proj.weight" in state:
            return ddp
    sample = ", ".join(repr(key) for key in list(state)[:5])
    raise CheckpointFormatError(
        f"{path}: no Swin image-encoder weights found: expected 'vision_encoder.*' keys (X-VLM) or "
        f"'patch_embed.proj.weight' and 'layers.*' (Swin / timm); the file has {len(state)} entries "
        f"such as {sample}"
    )


def infer_vision_config(weights: SwinWeights) -> dict:
    """X-VLM's Swin JSON fields read off the tensor shapes of ``weights``.

    embed_dim from patch_embed.proj.weight, depths from the block indices, num_heads and window_size from the
    relative-position-bias tables (stage 0's: a later stage's window may be clamped to its grid). image_res:
    the X-VLM wrapper's ``config['image_res']``; else from the stage-0 attn_mask buffer (4 * window *
    sqrt(windows)); else window * 32, X-VLM's convention (7 -> 224, 12 -> 384). The wrapper config's
    ``embed_dim`` is X-VLM's contrastive projection size, not Swin's, and is not used.
    """
    tensors, path = weights.tensors, weights.path
    proj = tensors.get("patch_embed.proj.weight")
    if proj is None or tuple(proj.shape[1:]) != (3, 4, 4):
        shape = None if proj is None else list(proj.shape)
        raise CheckpointFormatError(f"{path}: patch_embed.proj.weight is {shape}, expected [C, 3, 4, 4]")
    blocks: dict[int, int] = {}
    for key in tensors:
        if match := _BLOCK.match(key):
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if sorted(blocks) != list(range(len(blocks))) or not blocks:
        raise CheckpointFormatError(f"{path}: cannot read the Swin stages from its keys ({sorted(blocks)})")
    heads, window = [], 0
    for stage in range(len(blocks)):
        table = tensors.get(f"layers.{stage}.blocks.0.{_TABLE_SUFFIX}")
        if table is None or table.ndim != 2:
            raise CheckpointFormatError(f"{path}: no relative position table for stage {stage}")
        heads.append(table.shape[1])
        if stage == 0:
            window = _window_of_table(table.shape[0], path)
    embed_dim = proj.shape[0]
    return {
        "vision_width": embed_dim * 2 ** (len(blocks) - 1),
        "image_res": _infer_image_res(weights, window),
        "window_size": window,
        "embed_dim": embed_dim,
        "depths": [blocks[stage] for stage in range(len(blocks))],
        "num_heads": heads,
    }


def _window_of_table(rows: int, path: Path) -> int:
    if not _is_square_odd(rows):
        raise CheckpointFormatError(f"{path}: a relative position table has {rows} rows, not (2W-1)^2")
    return (math.isqrt(rows) + 1) // 2


def _infer_image_res(weights: SwinWeights, window: int) -> int:
    from_mask = None
    if weights.mask_windows is not None:
        from_mask = 4 * window * math.isqrt(weights.mask_windows)
    if weights.config_image_res is not None:
        if from_mask is not None and from_mask != weights.config_image_res:
            logger.warning(
                "%s: config image_res %d but the stored attention mask is for %d; using %d",
                weights.path,
                weights.config_image_res,
                from_mask,
                weights.config_image_res,
            )
        return weights.config_image_res
    return from_mask if from_mask is not None else window * 32


def load_swin_weights(swin: torch.nn.Module, weights: SwinWeights, model_desc: str) -> None:
    """Copy ``weights`` into ``swin`` (a timm SwinTransformer) strictly.

    Relative-position tables of another window size are resized first (``resize_relative_position_table``).
    Anything else that does not fit raises ``CheckpointMismatchError``, naming the keys as the file names
    them; nothing is loaded then.
    """
    expected = swin.state_dict()
    tensors = dict(weights.tensors)
    resized = 0
    for key, table in list(tensors.items()):
        want = expected.get(key)
        if key.endswith(_TABLE_SUFFIX) and want is not None and _resizable(table, want):
            tensors[key] = resize_relative_position_table(table, (math.isqrt(want.shape[0]) + 1) // 2)
            resized += 1
    missing = [weights.file_key(key) for key in expected if key not in tensors]
    unexpected = [weights.file_key(key) for key in tensors if key not in expected]
    mismatched = [
        (weights.file_key(key), tuple(value.shape), tuple(expected[key].shape))
        for key, value in tensors.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(weights.path, model_desc, missing, unexpected, mismatched)
    swin.load_state_dict(tensors, strict=True)
    logger.info(
        "loaded %d encoder tensors from %s (prefix %r, patch merging at stage %s, %d tables resized)",
        len(tensors),
        weights.path,
        weights.prefix,
        "end" if weights.merge_at_stage_end else "start",
        resized,
    )


def _resizable(table: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        table.shape != want.shape
        and table.ndim == 2
        and table.shape[1] == want.shape[1]
        and _is_square_odd(table.shape[0])
        and math.isqrt(table.shape[0]) >= 4
    )


def _is_square_odd(rows: int) -> bool:
    side = math.isqrt(rows)
    return side * side == rows and side % 2 == 1


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """Resize a relative-position-bias table to ``window`` the way X-VLM does when it changes resolution.

    X-VLM's ``interpolate_relative_pos_embed`` (taken from BEiT) places the source offsets at growing
    distances 0, +-1, +-(1+q), +-(1+q+q^2), ..., with q found by bisection so that the outermost one reaches
    the new table's edge, and evaluates scipy's ``interp2d(kind='cubic')`` at the new integer offsets. That is
    FITPACK's interpolating bicubic spline (smoothing 0): a not-a-knot cubic spline along each axis, computed
    here in float64 without scipy. Growing (7 -> 12) stretches the table; shrinking (12 -> 7, q = 1.01)
    keeps roughly its centre.

    table: (2S-1)^2 x heads, rows ordered (dy, dx) row-major. Returns (2W-1)^2 x heads, same dtype.
    """
    rows, heads = table.shape
    src, dst = math.isqrt(rows), 2 * window - 1
    if src == dst:
        return table
    if src < 4:
        raise ValueError(f"cannot resize a {src}x{src} relative position table: a cubic spline needs 4 rows")
    half = dst // 2
    weights = _not_a_knot_weights(_xvlm_offsets(src, dst), torch.arange(-half, half + 1, dtype=torch.float64))
    grid = table.detach().to(torch.float64).T.reshape(heads, src, src)
    resized = weights @ grid @ weights.T
    return resized.reshape(heads, dst * dst).T.contiguous().to(table.dtype)


def _xvlm_offsets(src: int, dst: int) -> torch.Tensor:
    """The offsets X-VLM assigns to the ``src`` rows of one table axis when resizing it to ``dst`` rows."""
    half_src, half_dst = src // 2, dst // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2
        outermost = (1.0 - ratio**half_src) / (1.0 - ratio)
        if outermost > half_dst:
            high = ratio
        else:
            low = ratio
    offsets, distance = [], 1.0
    for power in range(1, half_src + 1):
        offsets.append(distance)
        distance += ratio**power
    positive = torch.tensor(offsets, dtype=torch.float64)
    return torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive])


def _not_a_knot_weights(nodes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Q x N matrix mapping values at ``nodes`` to their not-a-knot cubic spline at ``queries``."""
    n = nodes.numel()
    step = nodes.diff()
    lhs = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        lhs[i, i - 1], lhs[i, i], lhs[i, i + 1] = step[i - 1], 2 * (step[i - 1] + step[i]), step[i]
        rhs[i, i - 1], rhs[i, i + 1] = 6 / step[i - 1], 6 / step[i]
        rhs[i, i] = -rhs[i, i - 1] - rhs[i, i + 1]
    # not-a-knot: the third derivative is continuous at the second and the second-to-last node
    lhs[0, 0], lhs[0, 1], lhs[0, 2] = step[1], -(step[0] + step[1]), step[0]
    lhs[-1, -3], lhs[-1, -2], lhs[-1, -1] = step[-1], -(step[-2] + step[-1]), step[-2]
    curvature = torch.linalg.solve(lhs, rhs)  # second derivatives at the nodes per unit of each value
    x = queries.clamp(nodes[0].item(), nodes[-1].item())  # FITPACK evaluates past the ends at the ends
    j = (torch.searchsorted(nodes, x, right=True) - 1).clamp(0, n - 2)
    h, left, right = step[j], nodes[j + 1] - x, x - nodes[j]
    identity = torch.eye(n, dtype=torch.float64)
    return (
        (left / h)[:, None] * identity[j]
        + (right / h)[:, None] * identity[j + 1]
        + ((left**3 / h - left * h) / 6)[:, None] * curvature[j]
        + ((right**3 / h - right * h) / 6)[:, None] * curvature[j + 1]
    )
