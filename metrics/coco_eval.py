"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) and the caption files they read.

Scores come from pycocoevalcap's scorers, called one by one rather than through ``COCOEvalCap.evaluate``
(which always runs SPICE and needs network access the first time). METEOR's Java process takes seconds to
start, so :class:`CaptionScorer` starts it once and reuses it; SPICE is reported as unavailable, with the
reason, when the Stanford CoreNLP jars it needs are missing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pycocoevalcap import spice as _spice_package
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice

from metrics.cider import CiderD
from metrics.diversity import Diversity, SetDiversity, caption_diversity
from metrics.java import java_missing
from metrics.tokenize import ptb_tokenize
from utils.io import DataFileError, ImageId, image_id_from_path, normalise_image_id, read_json

logger = logging.getLogger(__name__)

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
CLIP_METRICS = ("CLIP-S", "RefCLIP-S")  # evaluate.py --clip; rows shown when computed or asked for
DOMAINS = ("in-domain", "near-domain", "out-domain")
SPICE_LIB_DIR = Path(_spice_package.__file__).resolve().parent / "lib"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_PREVIEW = 5


class CaptionDataError(DataFileError):
    """A caption, result or annotation file (or the mapping built from it) is not usable."""


class CoverageError(CaptionDataError):
    """Predictions and ground truth cover different images."""


def _preview(ids: list) -> str:
    shown = ", ".join(repr(i) for i in ids[:_PREVIEW])
    return shown + (", ..." if len(ids) > _PREVIEW else "")


def load_ground_truth(path: str | os.PathLike) -> dict[ImageId, list[str]]:
    """Reference captions per image id from a COCO caption file or a Karpathy-style evaluation list.

    COCO: ``{"images": [...], "annotations": [{"image_id", "caption"}, ...]}``. Karpathy-style:
    ``[{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [refs...]}]``, the id taken from the
    entry's ``image_id`` when present, else from the file name (:func:`image_id_from_path`).
    Annotations with an empty caption are skipped with a warning.
    """
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        gts = _ground_truth_from_coco(data, path)
    elif isinstance(data, list):
        gts = _ground_truth_from_karpathy(data, path)
    else:
        raise CaptionDataError(
            f"{path}: expected a COCO caption file (an object with 'annotations') or a list of "
            f"{{'image', 'caption'}} entries, got {type(data).__name__}"
        )
    if not gts:
        raise CaptionDataError(f"{path}: no reference captions found")
    return gts


def _add_reference(gts: dict[ImageId, list[str]], image_id: ImageId, caption: Any) -> bool:
    if not isinstance(caption, str) or not caption.strip():
        return False
    gts.setdefault(image_id, []).append(caption)
    return True


def _ground_truth_from_coco(data: dict, path: str | os.PathLike) -> dict[ImageId, list[str]]:
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise CaptionDataError(f"{path}: 'annotations' must be a list")
    gts: dict[ImageId, list[str]] = {}
    skipped = 0
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CaptionDataError(f"{path}: annotation {index} lacks 'image_id' or 'caption': {ann!r:.200}")
        skipped += not _add_reference(gts, normalise_image_id(ann["image_id"]), ann["caption"])
    if skipped:
        logger.warning("%s: skipped %d annotations with an empty or non-text caption", path, skipped)
    image_ids = {normalise_image_id(img["id"]) for img in data.get("images", []) if "id" in img}
    without_refs = image_ids - gts.keys()
    if without_refs:
        logger.warning("%s: %d images have no caption and are ignored", path, len(without_refs))
    return gts


def _ground_truth_from_karpathy(entries: list, path: str | os.PathLike) -> dict[ImageId, list[str]]:
    gts: dict[ImageId, list[str]] = {}
    file_of_id: dict[ImageId, str] = {}
    skipped = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
            raise CaptionDataError(f"{path}: entry {index} lacks 'image' or 'caption': {entry!r:.200}")
        image = entry["image"]
        image_id = normalise_image_id(entry["image_id"]) if "image_id" in entry else image_id_from_path(image)
        if file_of_id.setdefault(image_id, image) != image:
            raise CaptionDataError(
                f"{path}: images {file_of_id[image_id]!r} and {image!r} both map to image id {image_id!r}"
            )
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        skipped += sum(not _add_reference(gts, image_id, caption) for caption in captions)
    if skipped:
        logger.warning("%s: skipped %d empty or non-text reference captions", path, skipped)
    return gts


def load_image_entries(path: str | os.PathLike) -> list[tuple[ImageId, str]]:
    """``(image id, file name)`` of every image of a caption file, in file order, with the ids that
    :func:`load_ground_truth` gives the same file: a COCO caption or image-info file (``images`` with ``id``
    and ``file_name``; nocaps' files are such) or a Karpathy-style list (``image``, optional ``image_id``)."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        pairs = [_coco_image_entry(image, path, index) for index, image in enumerate(data["images"])]
    elif isinstance(data, list):
        pairs = []
        for index, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise CaptionDataError(f"{path}: entry {index} lacks an 'image' file name: {entry!r:.200}")
            image_id = entry["image_id"] if "image_id" in entry else image_id_from_path(entry["image"])
            pairs.append((normalise_image_id(image_id), entry["image"]))
    else:
        raise CaptionDataError(
            f"{path}: expected a COCO caption file (an object with 'images') or a list of {{'image', ...}} entries"
        )
    unique = list(dict.fromkeys(pairs))  # Karpathy-style training lists repeat an image per caption
    files: dict[ImageId, str] = {}
    for image_id, file_name in unique:
        if files.setdefault(image_id, file_name) != file_name:
            raise CaptionDataError(f"{path}: images {files[image_id]!r} and {file_name!r} share image id {image_id!r}")
    if not unique:
        raise CaptionDataError(f"{path}: no images listed")
    return unique


def _coco_image_entry(image: Any, path: str | os.PathLike, index: int) -> tuple[ImageId, str]:
    if isinstance(image, dict) and "filename" in image and "sentences" in image:
        raise CaptionDataError(
            f"{path} is Karpathy's dataset file: run python -m data.prepare_coco on it and use its split files"
        )
    if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
        raise CaptionDataError(f"{path}: image {index} lacks 'id' or 'file_name': {image!r:.200}")
    return normalise_image_id(image["id"]), image["file_name"]


def load_image_domains(path: str | os.PathLike) -> dict[ImageId, str]:
    """``{image_id: domain}`` of a nocaps-style COCO file whose images carry ``domain``; else empty."""
    data = read_json(path)
    if not isinstance(data, dict):
        return {}
    return {
        normalise_image_id(img["id"]): str(img["domain"])
        for img in data.get("images", [])
        if isinstance(img, dict) and "id" in img and "domain" in img
    }


def parse_results(items: Any, source: str = "results") -> dict[ImageId, str]:
    """``{image_id: caption}`` from a COCO results list ``[{"image_id", "caption"}, ...]``.

    Raises :class:`CaptionDataError` (naming ``source``) for a non-list, entries without those keys,
    duplicate image ids or empty captions.
    """
    if not isinstance(items, list):
        raise CaptionDataError(f"{source}: expected a list of {{'image_id', 'caption'}}, got {type(items).__name__}")
    results: dict[ImageId, str] = {}
    duplicates: list[ImageId] = []
    empty: list[ImageId] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
            raise CaptionDataError(f"{source}: entry {index} lacks 'image_id' or 'caption': {item!r:.200}")
        image_id = normalise_image_id(item["image_id"])
        caption = item["caption"]
        if not isinstance(caption, str) or not caption.strip():
            empty.append(image_id)
        if image_id in results:
            duplicates.append(image_id)
        results[image_id] = caption
    if duplicates:
        raise CaptionDataError(f"{source}: {len(duplicates)} duplicate image ids: {_preview(duplicates)}")
    if empty:
        raise CaptionDataError(f"{source}: {len(empty)} empty captions, image ids: {_preview(empty)}")
    return results


def parse_caption_sets(items: list[dict], source: str = "results") -> dict[ImageId, list[str]]:
    """``{image_id: [caption, ...]}`` from the n-best lists of ``predict.py --num_captions K`` (each entry's
    ``captions``: ``[{"caption", "score"}, ...]``); empty when no entry has one. Call on a list that
    :func:`parse_results` accepted."""
    sets: dict[ImageId, list[str]] = {}
    for index, item in enumerate(items):
        if "captions" not in item:
            continue
        members = item["captions"]
        if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("caption"), str)
                                                    for m in members):  # fmt: skip
            raise CaptionDataError(f"{source}: entry {index}: 'captions' must be a list of {{'caption', 'score'}}")
        sets[normalise_image_id(item["image_id"])] = [member["caption"] for member in members]
    if sets and len(sets) != len(items):
        raise CaptionDataError(f"{source}: {len(items) - len(sets)} of {len(items)} entries have no 'captions' list")
    return sets


def load_results(path: str | os.PathLike) -> dict[ImageId, str]:
    """Predicted caption per image id from a COCO results JSON file (see :func:`parse_results`)."""
    return parse_results(read_json(path), source=str(path))


@dataclass
class Coverage:
    """Which images were scored: predictions vs ground truth (id lists are truncated previews)."""

    n_results: int
    n_ground_truth: int
    n_evaluated: int
    n_missing: int
    n_extra: int
    missing_ids: list = field(default_factory=list)
    extra_ids: list = field(default_factory=list)
    partial: bool = False

    def describe(self) -> str:
        parts = [f"{self.n_evaluated} of {self.n_ground_truth} ground-truth images have a prediction"]
        if self.n_missing:
            parts.append(f"{self.n_missing} ground-truth images without prediction: {_preview(self.missing_ids)}")
        if self.n_extra:
            parts.append(f"{self.n_extra} predictions for unknown images: {_preview(self.extra_ids)}")
        return "; ".join(parts)


@dataclass
class EvalReport:
    """Corpus metrics as fractions (CIDEr 1.331 = 133.1 in tables), with what could not be computed, and the
    captions' diversity (``set_diversity`` when there are several captions per image)."""

    metrics: dict[str, float]
    unavailable: dict[str, str] = field(default_factory=dict)
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)
    per_image: dict[ImageId, float] | None = None
    coverage: Coverage | None = None
    diversity: Diversity | None = None
    set_diversity: SetDiversity | None = None

    def format_table(self) -> str:
        """Metrics x100 in a text table, one column per domain when there are domains."""
        columns = {"overall": self.metrics, **self.per_domain}
        lines = [f"{'metric':<10}" + "".join(f"{name:>13}" for name in columns)]
        clip = [name for name in CLIP_METRICS if name in self.metrics or name in self.unavailable]
        for metric in (*METRICS, *clip):
            cells = [
                f"{values[metric] * 100:13.2f}" if metric in values else f"{'n/a':>13}" for values in columns.values()
            ]
            lines.append(f"{metric:<10}" + "".join(cells))
        for part in (self.diversity, self.set_diversity):
            lines += part.format_lines() if part is not None else []
        if self.coverage is not None:
            lines.append(("partial: " if self.coverage.partial else "") + self.coverage.describe())
        lines += [f"{metric} unavailable: {reason}" for metric, reason in self.unavailable.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; per-image scores are left out (see :attr:`per_image`)."""
        summary = asdict(self)
        del summary["per_image"]
        return summary


def spice_unavailable_reason(lib_dir: Path = SPICE_LIB_DIR) -> str | None:
    """Why SPICE cannot run (its Stanford CoreNLP jars are missing from ``lib_dir``), or None if it can."""
    missing = [name for name in CORENLP_JARS if not (lib_dir / name).is_file()]
    if not missing:
        return None
    return (
        f"Stanford CoreNLP jars missing at {lib_dir} ({', '.join(missing)}); SPICE downloads them on first "
        f"use, which needs network access: run it once online or copy them there from "
        f"stanford-corenlp-full-2015-12-09.zip"
    )


def _subset(mapping: Mapping[int, Any], keys: list[int]) -> dict[int, Any]:
    return {key: mapping[key] for key in keys}


class CaptionScorer:
    """pycocoevalcap's scorers with one METEOR Java process, started on first use and kept until close().

    ``spice_lib_dir`` is where the SPICE CoreNLP jars are checked for; SPICE itself runs from
    pycocoevalcap's installation, so only the default makes SPICE run when the jars are there.
    """

    def __init__(self, spice_lib_dir: Path = SPICE_LIB_DIR) -> None:
        self.spice_lib_dir = Path(spice_lib_dir)
        self._meteor: Meteor | None = None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop METEOR's Java process (a later score() starts a new one)."""
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        process = meteor.meteor_p
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
        # pycocoevalcap keeps its lock when a score call fails half-way; its __del__ would then hang.
        if meteor.lock.locked():
            meteor.lock.release()

    def score(
        self,
        gts: Mapping[Hashable, list[str]],
        res: Mapping[Hashable, str],
        per_image: bool = False,
        spice: bool = True,
        domains: Mapping[Hashable, str] | None = None,
        meteor: bool = True,
    ) -> EvalReport:
        """Score one predicted caption per image against its references.

        gts: ``{image_id: [reference, ...]}``; res: ``{image_id: caption}`` with the same ids.
        per_image adds each image's CIDEr; spice=False skips SPICE (slow), meteor=False skips METEOR (a few
        seconds per 1,000 images); domains (``{image_id: name}``) adds metrics per domain, each computed on
        that domain's images alone as nocaps does.
        """
        if gts.keys() != res.keys():
            raise CaptionDataError("gts and res must have the same image ids; use evaluate_results for coverage")
        if not gts:
            raise CaptionDataError("nothing to score: no images")
        missing_java = java_missing()
        if missing_java:
            raise RuntimeError(missing_java)
        ids = list(gts)
        if meteor:
            self._start_meteor()  # Java loads METEOR's tables while the tokenizer runs
        gts_tok, res_tok = self._tokenize([gts[i] for i in ids], [res[i] for i in ids])
        keys = list(range(len(ids)))
        metrics, cider_per_image = self._corpus_metrics(gts_tok, res_tok, meteor)
        report = EvalReport(metrics=metrics, diversity=caption_diversity([res_tok[k][0] for k in keys]))
        if not meteor:
            report.unavailable["METEOR"] = "skipped (meteor=False)"
        spice_per_image = self._spice(gts_tok, res_tok, report) if spice else None
        if not spice:
            report.unavailable["SPICE"] = "skipped (spice=False)"
        if per_image:
            report.per_image = {ids[k]: float(cider_per_image[k]) for k in keys}
        for domain, members in self._group_by_domain(ids, domains).items():
            report.per_domain[domain], _ = self._corpus_metrics(
                _subset(gts_tok, members), _subset(res_tok, members), meteor
            )
            if spice_per_image is not None:
                report.per_domain[domain]["SPICE"] = float(sum(spice_per_image[k] for k in members) / len(members))
        return report

    @staticmethod
    def _tokenize(refs: list[list[str]], hyps: list[str]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
        """PTB-tokenise references and predictions in one Java run (keys ``0..n-1`` for both)."""
        both: dict[Hashable, list[str]] = {("ref", k): r for k, r in enumerate(refs)}
        both.update({("hyp", k): [c] for k, c in enumerate(hyps)})
        tokens = ptb_tokenize(both)
        return {k: tokens[("ref", k)] for k in range(len(refs))}, {k: tokens[("hyp", k)] for k in range(len(hyps))}

    def _corpus_metrics(self, gts: dict[int, list[str]], res: dict[int, list[str]], meteor: bool) -> tuple[dict, list]:
        # METEOR's Java process scores in a thread (it mostly waits on the pipe) while Python runs the others.
        with ThreadPoolExecutor(max_workers=1) as pool:
            meteor_future = pool.submit(self._meteor_score, gts, res) if meteor else None
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            rouge = float(Rouge().compute_score(gts, res)[0])
            # CiderD() in corpus mode is pycocoevalcap's Cider (equal to 1e-15), about twice as fast.
            cider, cider_per_image = CiderD(cache_size=0).compute_score(gts, res)
            metrics = {f"BLEU-{n + 1}": float(value) for n, value in enumerate(bleu)}
            if meteor_future is not None:
                metrics["METEOR"] = meteor_future.result()
        metrics.update({"ROUGE-L": rouge, "CIDEr": float(cider)})
        return metrics, list(cider_per_image)

    def _start_meteor(self) -> None:
        if self._meteor is not None and self._meteor.meteor_p.poll() is not None:
            # killed, or out of memory, since the last call
            logger.warning("METEOR's Java process had exited (status %s): restarting it", self._meteor.meteor_p.poll())
            self.close()
        if self._meteor is None:
            logger.info("starting METEOR (Java)")
            self._meteor = Meteor()

    def _meteor_score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        """METEOR through the kept Java process; a call that fails is retried once with a new process."""
        try:
            return self._meteor_once(gts, res)
        except Exception as err:
            logger.warning("METEOR failed (%s: %s): retrying with a new Java process", type(err).__name__, err)
        try:
            return self._meteor_once(gts, res)
        except Exception as err:
            raise RuntimeError(f"METEOR failed twice ({type(err).__name__}: {err})") from err

    def _meteor_once(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        self._start_meteor()
        try:
            return float(self._meteor.compute_score(gts, res)[0])
        except Exception:
            self.close()
            raise

    def _spice(self, gts: dict[int, list[str]], res: dict[int, list[str]], report: EvalReport) -> list | None:
        """Per-image SPICE F-scores (also stored in ``report``), or None with the reason recorded."""
        reason = spice_unavailable_reason(self.spice_lib_dir)
        if reason is None:
            try:
                average, scores = Spice().compute_score(gts, res)
            except (OSError, subprocess.CalledProcessError) as err:
                reason = f"SPICE failed: {err}"
            else:
                report.metrics["SPICE"] = float(average)
                return [score["All"]["f"] for score in scores]
        logger.warning("SPICE unavailable: %s", reason)
        report.unavailable["SPICE"] = reason
        return None

    @staticmethod
    def _group_by_domain(ids: list[ImageId], domains: Mapping[Hashable, str] | None) -> dict[str, list[int]]:
        if not domains:
            return {}
        groups: dict[str, list[int]] = {}
        for key, image_id in enumerate(ids):
            if image_id in domains:
                groups.setdefault(domains[image_id], []).append(key)
        unlabelled = len(ids) - sum(len(members) for members in groups.values())
        if unlabelled:
            logger.warning("%d scored images have no domain; they count only in the overall metrics", unlabelled)
        order = {name: rank for rank, name in enumerate(DOMAINS)}
        return dict(sorted(groups.items(), key=lambda item: (order.get(item[0], math.inf), item[0])))


def check_coverage(
    results: Mapping[ImageId, str], gts: Mapping[ImageId, list[str]], allow_partial: bool = False
) -> Coverage:
    """Compare the image ids of predictions and ground truth; raise :class:`CoverageError` if they differ
    (unless ``allow_partial``) or if they share no image at all."""
    missing = [image_id for image_id in gts if image_id not in results]
    extra = [image_id for image_id in results if image_id not in gts]
    coverage = Coverage(
        n_results=len(results),
        n_ground_truth=len(gts),
        n_evaluated=len(gts) - len(missing),
        n_missing=len(missing),
        n_extra=len(extra),
        missing_ids=missing[:_PREVIEW],
        extra_ids=extra[:_PREVIEW],
        partial=bool(missing or extra),
    )
    if coverage.n_evaluated == 0:
        raise CoverageError(f"predictions and ground truth share no image id: {coverage.describe()}")
    if coverage.partial and not allow_partial:
        raise CoverageError(f"{coverage.describe()}. Use allow_partial (--allow_partial) to score the overlap only")
    if coverage.partial:
        logger.warning("scoring the overlap only: %s", coverage.describe())
    return coverage


def evaluate_results(
    results: Mapping[ImageId, str],
    gts: Mapping[ImageId, list[str]],
    allow_partial: bool = False,
    spice: bool = True,
    per_image: bool = False,
    scorer: CaptionScorer | None = None,
    domains: Mapping[ImageId, str] | None = None,
    meteor: bool = True,
) -> EvalReport:
    """Score predictions (``{image_id: caption}``) against ground truth after a coverage check.

    Uses ``scorer`` when given (keeping its METEOR process), else a temporary one.
    """
    coverage = check_coverage(results, gts, allow_partial)
    overlap = [image_id for image_id in gts if image_id in results]
    gts_used = {image_id: gts[image_id] for image_id in overlap}
    res_used = {image_id: results[image_id] for image_id in overlap}
    with contextlib.ExitStack() as stack:
        if scorer is None:
            scorer = stack.enter_context(CaptionScorer())
        report = scorer.score(gts_used, res_used, per_image=per_image, spice=spice, domains=domains, meteor=meteor)
    report.coverage = coverage
    return report
