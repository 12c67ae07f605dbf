"""A training run: set-up, resume, epochs of XE or SCST, validation, checkpoints, final test."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data.datasets import CaptionCollator, CaptionImageDataset, CaptionTrainDataset, collate_images, read_annotations
from data.sampler import ShardedSampler
from data.text import clean_caption, strip_stop
from data.transforms import build_transform
from engine.evaluation import generate_captions, score_split
from engine.features import cache_features
from engine.loop import Trainer, TrainState, run_epoch
from engine.optim import build_optimizer, linear_schedule, trainable_parameters
from engine.steps import ScstStep, XEStep
from models.build import architecture, build_captioner, rebuild_captioner
from models.captioner import OPGCaptioner
from models.decoding import DecodeOptions
from models.tokenizer import caption_vocabulary, load_tokenizer
from utils import distributed
from utils.checkpoint import CheckpointError, load_state_strict, read_checkpoint, save_checkpoint
from utils.cider import CiderD
from utils.cider_df import DocumentFrequency
from utils.coco_eval import CaptionScorer, EvalReport
from utils.config import Config, to_dict, to_yaml
from utils.logs import MetricsLog, setup_logging
from utils.precision import grad_scaler, resolve_precision

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """One invocation of ``train_scst.py``."""

    def __init__(self, cfg: Config, scorer: CaptionScorer | None = None) -> None:
        """``scorer`` lets several runs in one process share the COCO scorers (and METEOR's Java process)."""
        self.cfg = cfg
        self.dist = distributed.setup(cfg.device)
        self.run_dir = Path(cfg.output_dir).expanduser().resolve()
        setup_logging(self.dist.rank, self.run_dir / "train.log")
        seed_everything(cfg.train.seed + self.dist.rank)
        self.precision = resolve_precision(cfg.train.precision, self.dist.device)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.dist.is_main else None)
        self.stage = "scst" if cfg.scst else "xe"
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self._prepare_data()
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.model = self._build_model()
        self._owns_scorer = scorer is None
        self.scorer = (scorer or CaptionScorer()) if self.dist.is_main else None

    # ----- set-up -------------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        data = self.cfg.data
        if not data.synthetic:
            return
        from data.synthetic import ensure_generated

        if self.dist.is_main:
            ensure_generated(data.image_root, [data.train_file, data.val_file, data.test_file])
        distributed.barrier()

    def _build_model(self) -> OPGCaptioner:
        cfg = self.cfg
        resumable = cfg.resume and (self.run_dir / "last.pt").is_file()
        if cfg.scst and not cfg.checkpoint and not resumable:
            raise ValueError("SCST starts from a cross-entropy checkpoint: give --checkpoint PATH")
        if cfg.checkpoint:
            payload = read_checkpoint(cfg.checkpoint)
            model = rebuild_captioner(cfg, payload["architecture"])
            load_state_strict(model, payload["model"], cfg.checkpoint)
            logger.info("initialised from %s", cfg.checkpoint)
            if (model.output_ids is None) != (cfg.model.output_vocab == "full"):
                logger.warning("model.output_vocab=%s is ignored: %s keeps its own output vocabulary (%s)",
                               cfg.model.output_vocab, cfg.checkpoint,
                               "full" if model.output_ids is None else f"{len(model.output_ids)} tokens")  # fmt: skip
        else:
            model = build_captioner(cfg, output_ids=self._output_vocabulary())
        if cfg.model.use_sparse_mask and cfg.model.sparse_mask_mode == "hard":
            model.sparse_mask.requires_grad_(False)  # a hard threshold passes no gradient to it
        return model.to(self.dist.device)

    def _output_vocabulary(self) -> torch.Tensor | None:
        if self.cfg.model.output_vocab == "full":
            return None
        max_words = self.cfg.data.max_words
        entries = read_annotations(self.cfg.data.train_file, "train")
        captions = (clean_caption(e["caption"], max_words) for e in entries)
        ids = caption_vocabulary(self.tokenizer, captions)
        logger.info("output vocabulary: the %d GPT-2 tokens of the training captions", len(ids))
        return ids

    def _datasets(self) -> tuple[Any, CaptionImageDataset]:
        d, res = self.cfg.data, self.model.encoder.image_res
        test_transform = build_transform(res, train=False)
        train_transform = build_transform(res, train=d.augment)
        if self.cfg.scst:
            train = CaptionImageDataset(d.train_file, d.image_root, train_transform, "train")
        else:
            train = CaptionTrainDataset(d.train_file, d.image_root, train_transform, d.max_words)
        val_file = d.val_file if self.cfg.train.eval_split == "val" else d.test_file
        val = CaptionImageDataset(val_file, d.image_root, test_transform, self.cfg.train.eval_split)
        self._cache_features([train, val])
        return train, val

    def _cache_features(self, datasets: list[Any]) -> None:
        if self.cfg.data.cache_features:
            cache_features(
                self.model.encoder, datasets, self.dist.device, self.cfg.train.eval_batch_size,
                self.cfg.data.num_workers, self.precision, self.dist,
                Path(self.cfg.data.feature_cache_dir) if self.cfg.data.feature_cache_dir else None,
                self.cfg.data.feature_cache_dtype,
            )  # fmt: skip

    def _per_rank_batch(self) -> int:
        total, world = self.cfg.train.batch_size, self.dist.world_size
        if total % world:
            raise ValueError(f"train.batch_size {total} must be divisible by the number of processes {world}")
        return total // world

    def _loader(self, dataset: Any, epoch: int, skip_batches: int) -> DataLoader:
        per_rank = self._per_rank_batch()
        sampler = ShardedSampler(
            len(dataset), self.dist.rank, self.dist.world_size, True, self.cfg.train.seed, epoch,
            skip=skip_batches * per_rank,
        )  # fmt: skip
        # Captions longer than GPT-2's remaining positions are cut (the reference keeps 30 words anyway).
        max_tokens = self.model.gpt.config.n_positions - self.model.prefix_length + 1
        collate = collate_images if self.cfg.scst else CaptionCollator(self.tokenizer, min(64, max_tokens))
        return DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            drop_last=True,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=self.dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch),
            persistent_workers=False,
        )

    def _steps_per_epoch(self, dataset: Any) -> int:
        per_epoch = len(dataset) // self.cfg.train.batch_size
        if self.cfg.train.max_steps_per_epoch:
            per_epoch = min(per_epoch, self.cfg.train.max_steps_per_epoch)
        if per_epoch < 1:
            raise ValueError(f"{len(dataset)} training items give no full batch of {self.cfg.train.batch_size}")
        return per_epoch

    # ----- the run ------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        train_set, val_set = self._datasets()
        steps_per_epoch = self._steps_per_epoch(train_set)
        lr = cfg.train.lr
        optimizer = build_optimizer(self.model, lr, cfg.train.weight_decay)
        scheduler = linear_schedule(optimizer, steps_per_epoch * cfg.train.epochs, cfg.train.warmup_ratio)
        trainer = Trainer(
            params=trainable_parameters(self.model), optimizer=optimizer, scheduler=scheduler,
            scaler=grad_scaler(self.precision, self.dist.device), precision=self.precision, dist=self.dist,
            cfg=cfg.train, metrics=self.metrics, sync_gradients=cfg.scst and self.dist.world_size > 1,
        )  # fmt: skip
        if cfg.resume:
            self._resume(trainer)
        step_fn = self._step_fn(train_set)
        logger.info(
            "%s training: %d items, %d steps/epoch, %d epochs, batch %d on %d process(es), %s, %s",
            self.stage.upper(), len(train_set), steps_per_epoch, cfg.train.epochs, cfg.train.batch_size,
            self.dist.world_size, self.dist.device, self.precision,
        )  # fmt: skip
        state = trainer.state
        if cfg.scst and state.global_step == 0:
            self._validate(trainer, val_set, "validating the starting checkpoint")
        while state.epoch < cfg.train.epochs:
            loader = self._loader(train_set, state.epoch, state.epoch_step)
            batches = _take(loader, steps_per_epoch - state.epoch_step)
            save = lambda: self._save(trainer, self.run_dir / "last.pt")  # noqa: E731
            desc = f"{self.stage} epoch {state.epoch + 1}/{cfg.train.epochs}"
            if not run_epoch(trainer, batches, steps_per_epoch, step_fn, save, desc):
                return {"stopped": True, "state": state.to_dict()}
            self._end_epoch(trainer, val_set)
        return self._final_test()

    def _step_fn(self, train_set: Any) -> Any:
        if not self.cfg.scst:
            forward_model = self.model
            if self.dist.world_size > 1:
                device_ids = [self.dist.device] if self.dist.device.type == "cuda" else None
                forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
            return XEStep(forward_model, self.dist.device, self.cfg.train)
        references = [[strip_stop(clean_caption(c, self.cfg.data.max_words)) for c in e["caption"]]
                      for e in train_set.entries]  # fmt: skip
        cider = CiderD(self._document_frequency(references))
        return ScstStep(
            self.model, self.tokenizer, cider, references, self.cfg.scst_opts, self.cfg.decode, self.dist.device
        )

    def _document_frequency(self, references: list[list[str]]) -> DocumentFrequency:
        path = Path(self.cfg.data.cider_df) if self.cfg.data.cider_df else self.run_dir / "cider_df.json.gz"
        if path.is_file():
            logger.info("CIDEr-D document frequencies from %s", path)
            return DocumentFrequency.load(path)
        df = DocumentFrequency.from_references(references)
        if self.dist.is_main:
            df.save(path)
            logger.info("CIDEr-D document frequencies of %d training images cached in %s", len(references), path)
        return df

    def _end_epoch(self, trainer: Trainer, val_set: CaptionImageDataset) -> None:
        state = trainer.state
        state.epoch += 1
        state.epoch_step = 0
        self._validate(trainer, val_set, f"validating epoch {state.epoch}")
        self._save(trainer, self.run_dir / "last.pt")

    def _validate(self, trainer: Trainer, val_set: CaptionImageDataset, desc: str) -> None:
        """Score the validation split and keep best.pt. SCST also scores its starting checkpoint, so
        its best.pt is never worse on validation than the model it started from."""
        state = trainer.state
        options = self._decode_options(validation=True)
        report, _ = self._evaluate(val_set, options, spice=False, desc=desc, meteor=self.cfg.train.val_meteor)
        if self.dist.is_main:
            score = report.metrics["CIDEr"]
            self.metrics.write("val", epoch=state.epoch, step=state.global_step, **report.metrics)
            logger.info("epoch %d %s:\n%s", state.epoch, self.cfg.train.eval_split, report.format_table())
            if state.skipped_images:
                logger.warning("%d unreadable training images skipped so far", state.skipped_images)
            if score > state.best_score:
                state.best_score = score
                self._save(None, self.run_dir / "best.pt")
                logger.info("new best %s CIDEr %.4f -> %s", self.cfg.train.eval_split, score, "best.pt")
        state.best_score = distributed.broadcast_object(state.best_score)

    def _decode_options(self, validation: bool) -> DecodeOptions:
        """Test-time decoding; XE validates with greedy decoding, as the reference does."""
        if validation and not self.cfg.scst:
            return DecodeOptions.from_config(self.cfg.decode, method="greedy", beams=1)
        return DecodeOptions.from_config(self.cfg.decode)

    def _evaluate(
        self, dataset: CaptionImageDataset, options: DecodeOptions, spice: bool, desc: str, meteor: bool = True
    ) -> tuple[EvalReport, dict]:
        captions = generate_captions(
            self.model, dataset, self.tokenizer, options, self.dist, self.cfg.train.eval_batch_size,
            self.cfg.data.num_workers, self.precision, desc,
        )  # fmt: skip
        if not self.dist.is_main:
            return EvalReport(metrics={}), captions
        return score_split(captions, dataset, self.scorer, spice, meteor), captions

    def _final_test(self) -> dict[str, Any]:
        """Test split with the best checkpoint and test-time decoding; SPICE when available."""
        d = self.cfg.data
        best = self.run_dir / "best.pt"
        if best.is_file():
            load_state_strict(self.model, read_checkpoint(best)["model"], str(best))
        transform = build_transform(self.model.encoder.image_res)
        test_set = CaptionImageDataset(d.test_file, d.image_root, transform, "test")
        self._cache_features([test_set])
        report, captions = self._evaluate(test_set, self._decode_options(validation=False), True, "test")
        if not self.dist.is_main:
            return {}
        self.metrics.write("test", **report.metrics)
        out = self.run_dir / "test_metrics.json"
        out.write_text(report.to_json())
        results = [{"image_id": k, "caption": v} for k, v in captions.items()]
        (self.run_dir / "test_predictions.json").write_text(json.dumps(results, indent=1))
        logger.info("test (best checkpoint, %d beams):\n%s", self.cfg.decode.beams, report.format_table())
        return {"test": report.metrics, "unavailable": report.unavailable, "captions": captions}

    # ----- checkpoints --------------------------------------------------------------------------------
    def _save(self, trainer: Trainer | None, path: Path) -> None:
        if not self.dist.is_main:
            return
        train_state = None
        if trainer is not None:
            train_state = {
                "stage": self.stage,
                "counters": trainer.state.to_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict(),
                "rng": _rng_state(),
            }
        save_checkpoint(path, self.model, to_dict(self.cfg), architecture(self.model), train_state)

    def _resume(self, trainer: Trainer) -> None:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            logger.info("nothing to resume in %s: starting fresh", self.run_dir)
            return
        payload = read_checkpoint(path)
        state = payload.get("train_state")
        if state is None or state.get("stage") != self.stage:
            raise CheckpointError(f"{path} holds no {self.stage.upper()} training state to resume from")
        load_state_strict(self.model, payload["model"], str(path))
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.state = TrainState(**state["counters"])
        if self.dist.is_main:
            _set_rng_state(state["rng"])
        else:
            seed_everything(self.cfg.train.seed + self.dist.rank + trainer.state.global_step)
        logger.info("resumed %s at epoch %d, step %d", path, trainer.state.epoch + 1, trainer.state.epoch_step)

    def close(self) -> None:
        if self.scorer is not None and self._owns_scorer:
            self.scorer.close()
        distributed.cleanup()


def _take(loader: DataLoader, count: int):
    for i, batch in enumerate(loader):
        if i >= count:
            break
        yield batch
