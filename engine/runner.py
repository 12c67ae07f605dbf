"""A training run: set-up, resume, epochs of XE or SCST, validation, checkpoints, final test."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data.datasets import CaptionCollator, CaptionImageDataset, CaptionTrainDataset, collate_images, read_annotations
from data.sampler import ShardedSampler
from data.shard_eval import ShardEvalData
from data.shards import ShardTrainData, StreamPlan, check_shard_failures, collate_references, usable_workers
from data.text import clean_caption, strip_stop
from data.transforms import build_transform
from engine.config import Config
from engine.evaluation import generate_captions, score_split
from engine.features import cache_features
from engine.loop import EpochEnd, Optimization, Trainer, TrainState, run_epoch
from engine.optim import build_optimizer, linear_schedule, trainable_parameters
from engine.preemption import LoaderBatches, ignore_stop_signals
from engine.steps import ScstStep, XEStep, compile_forward
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from metrics.coco_eval import CaptionScorer, EvalReport
from models.build import architecture, build_captioner, rebuild_captioner
from models.captioner import OPGCaptioner
from models.decoding import DecodeOptions
from models.tokenizer import caption_vocabulary, load_tokenizer
from utils import distributed
from utils.checkpoint import CheckpointError, load_state_strict, read_checkpoint, resume_checkpoint, save_checkpoint
from utils.config import to_dict, to_yaml
from utils.io import ImageId, remove_stale_temporaries, write_json, write_text
from utils.logs import MetricsLog, setup_logging
from utils.precision import grad_scaler, resolve_precision
from utils.reporting import open_reporters, sample_table

logger = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """Validation failed (Java gone, METEOR dead, out of memory while decoding); last.pt holds the epoch."""


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


@dataclass
class RunResult:
    """How :meth:`Run.train` ended. A run trained to the end has ``stop`` None and, on the main process,
    the test split's ``test`` metrics, the ``unavailable`` ones with why, and its ``captions``. A run
    stopped early has ``stop`` (a stop signal, named in ``signal``, or ``train.stop_after_steps``)."""

    state: TrainState
    stop: EpochEnd | None = None
    signal: str | None = None
    test: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    captions: dict[ImageId, str] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return self.stop is not None


class Run:
    """One invocation of ``train_scst.py``."""

    def __init__(self, cfg: Config, scorer: CaptionScorer | None = None) -> None:
        """``scorer`` lets several runs in one process share the COCO scorers (and METEOR's Java process)."""
        self.cfg = cfg
        self.dist = distributed.setup(cfg.device)
        self.run_dir = Path(cfg.output_dir).expanduser().resolve()
        self.stage = "scst" if cfg.scst else "xe"
        setup_logging(self.dist.rank, self.run_dir / "train.log")
        # Read and checked before any other work: a bad last.pt fails in seconds, not after set-up.
        self._resume_payload = self._read_resume_checkpoint()
        # Every rank builds the same model: a random encoder's features (and their cache key) must agree.
        seed_everything(cfg.train.seed)
        self.precision = resolve_precision(cfg.train.precision, self.dist.device)
        reporters = open_reporters(cfg.train.report_to, self.run_dir, to_dict(cfg)) if self.dist.is_main else []
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.dist.is_main else None, reporters)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(self.run_dir)
            if removed:
                logger.warning("removed %d incomplete file(s) left by an interrupted write: %s", len(removed),
                               ", ".join(removed))  # fmt: skip
            write_text(self.run_dir / "config.yaml", to_yaml(cfg))
        self._prepare_data()
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.model = self._build_model()
        if self.dist.rank:
            # Draws that must differ between ranks (dropout, augmentation) start once the model exists; rank 0
            # continues its stream, so one process draws the same with or without DDP.
            seed_everything(cfg.train.seed + self.dist.rank)
        self._dropped_entries: dict[str, int] = {}  # training annotation entries left out, by reason
        self._owns_scorer = scorer is None
        self.scorer = (scorer or CaptionScorer()) if self.dist.is_main else None

    # ----- set-up -------------------------------------------------------------------------------------
    def _read_resume_checkpoint(self) -> dict[str, Any] | None:
        """With ``resume``: the run's last.pt, which must exist and hold this stage's training state."""
        if not self.cfg.resume:
            return None
        path = resume_checkpoint(self.run_dir)
        payload = read_checkpoint(path)
        state = payload.get("train_state")
        if state is None or state.get("stage") != self.stage:
            raise CheckpointError(f"{path} holds no {self.stage.upper()} training state to resume from")
        return payload

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
        if self._resume_payload is not None:
            # Every weight comes from last.pt: rebuild its architecture, read no encoder or GPT-2 files.
            model = rebuild_captioner(cfg, self._resume_payload["architecture"])
            load_state_strict(model, self._resume_payload["model"], str(self.run_dir / "last.pt"))
        elif cfg.scst and not cfg.checkpoint:
            raise ValueError("SCST starts from a cross-entropy checkpoint: give --checkpoint PATH")
        elif cfg.checkpoint:
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
        if cfg.train.grad_checkpointing:
            model.enable_grad_checkpointing()
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
        if d.train_shards:
            train = ShardTrainData(d.train_shards, d.train_samples, train_transform, d.max_words, d.shuffle_buffer,
                                   references=self.cfg.scst)  # fmt: skip
        elif self.cfg.scst:
            train = CaptionImageDataset(d.train_file, d.image_root, train_transform, "train")
        else:
            train = CaptionTrainDataset(d.train_file, d.image_root, train_transform, d.max_words)
        val_file = d.val_file if self.cfg.train.eval_split == "val" else d.test_file
        if d.val_shards and self.cfg.train.eval_split == "val":
            val: Any = ShardEvalData(d.val_shards, test_transform)
        else:
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

    def _micro_batch(self) -> int:
        """Images one process reads at a time: train.batch_size over processes and micro-batches."""
        total, world, accum = self.cfg.train.batch_size, self.dist.world_size, self.cfg.train.accum_steps
        if total % (world * accum):
            raise ValueError(f"train.batch_size {total} must be divisible by the number of processes {world} "
                             f"times train.accum_steps {accum}")  # fmt: skip
        return total // (world * accum)

    def _collate(self) -> Any:
        if self.cfg.scst:
            return collate_references if self.cfg.data.train_shards else collate_images
        # Captions are cut at data.max_tokens, and at GPT-2's remaining positions.
        max_tokens = self.model.gpt.config.n_positions - self.model.prefix_length + 1
        return CaptionCollator(self.tokenizer, min(self.cfg.data.max_tokens, max_tokens))

    def _shard_loader(self, data: ShardTrainData, epoch: int, skip_steps: int, steps: int) -> DataLoader:
        """This process's micro-batches of the epoch from shards (``data/shards.py``), after its first
        ``skip_steps`` optimizer steps."""
        dist, accum = self.dist, self.cfg.train.accum_steps
        workers = usable_workers(self.cfg.data.num_workers, len(data.shard_set.shards), dist.world_size)
        plan = StreamPlan(self.cfg.train.seed, epoch, dist.rank, dist.world_size, workers, self._micro_batch(),
                          steps * accum, skip_steps * accum)  # fmt: skip
        return DataLoader(
            data.stream(plan), batch_size=plan.batch, num_workers=workers, collate_fn=self._collate(),
            pin_memory=dist.device.type == "cuda", worker_init_fn=ignore_stop_signals,
            # its own generator: drawing the workers' seed from the global one would shift dropout on resume
            generator=torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch),
        )  # fmt: skip

    def _loader(self, dataset: Any, epoch: int, skip_steps: int, steps: int) -> DataLoader:
        """This process's micro-batches of ``epoch`` after its first ``skip_steps`` optimizer steps."""
        if isinstance(dataset, ShardTrainData):
            return self._shard_loader(dataset, epoch, skip_steps, steps)
        micro = self._micro_batch()
        sampler = ShardedSampler(
            len(dataset), self.dist.rank, self.dist.world_size, True, self.cfg.train.seed, epoch,
            skip=skip_steps * self.cfg.train.accum_steps * micro,
        )  # fmt: skip
        collate = self._collate()
        return DataLoader(
            dataset,
            batch_size=micro,
            sampler=sampler,
            drop_last=True,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=self.dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch),
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals,
        )

    def _steps_per_epoch(self, dataset: Any) -> int:
        per_epoch = len(dataset) // self.cfg.train.batch_size
        if self.cfg.train.max_steps_per_epoch:
            per_epoch = min(per_epoch, self.cfg.train.max_steps_per_epoch)
        if per_epoch < 1:
            raise ValueError(f"{len(dataset)} training items give no full batch of {self.cfg.train.batch_size}")
        return per_epoch

    # ----- the run ------------------------------------------------------------------------------------
    def train(self) -> RunResult:
        cfg = self.cfg
        train_set, val_set = self._datasets()
        self._dropped_entries = train_set.dropped
        steps_per_epoch = self._steps_per_epoch(train_set)
        # The schedule spans train.total_steps (the reference's SCST) or all epochs; the run ends at the
        # earlier of the two.
        schedule_steps = cfg.train.total_steps or steps_per_epoch * cfg.train.epochs
        total_steps = min(schedule_steps, steps_per_epoch * cfg.train.epochs)
        epochs = math.ceil(total_steps / steps_per_epoch)
        trainer = Trainer(self._optimization(schedule_steps), self.dist, cfg.train, self.metrics)
        if cfg.resume:
            self._resume(trainer)
        step_fn = self._step_fn(train_set)
        logger.info(
            "%s training: %d items, %d steps/epoch, %d steps in %d epoch(s), batch %d on %d process(es) in %d "
            "micro-batch(es), %s, %s",
            self.stage.upper(), len(train_set), steps_per_epoch, total_steps, epochs, cfg.train.batch_size,
            self.dist.world_size, cfg.train.accum_steps, self.dist.device, self.precision,
        )  # fmt: skip
        if schedule_steps > total_steps:
            logger.info("the learning-rate schedule spans %d steps (train.total_steps): this run ends before it "
                        "reaches 0", schedule_steps)  # fmt: skip
        state = trainer.state
        with trainer.stop:
            if cfg.scst and state.global_step == 0:
                self._validate(trainer, val_set, "validating the starting checkpoint")
            if state.validation_pending:  # resumed after a failure or a stop during that validation
                self._validate_epoch(trainer, val_set)
            while state.epoch < epochs:
                in_epoch = min(steps_per_epoch, total_steps - state.epoch * steps_per_epoch)
                # Training mode at every epoch, as the reference: GPT-2 from from_pretrained comes in eval mode.
                self.model.train()
                if isinstance(step_fn, ScstStep):
                    step_fn.set_epoch(state.epoch)
                loader = self._loader(train_set, state.epoch, state.epoch_step, steps_per_epoch)
                save = lambda: self._save(trainer, self.run_dir / "last.pt")  # noqa: E731
                desc = f"{self.stage} epoch {state.epoch + 1}/{epochs}"
                micro_batches = (in_epoch - state.epoch_step) * cfg.train.accum_steps
                with LoaderBatches(loader, micro_batches) as batches:
                    checked = check_shard_failures(batches, cfg.data.on_bad_shard)
                    end = run_epoch(trainer, checked, in_epoch, step_fn, save, desc)
                if end is EpochEnd.COMPLETE:
                    end = self._end_epoch(trainer, val_set)
                if end is not EpochEnd.COMPLETE:
                    return RunResult(state, stop=end, signal=trainer.stop.signal_name)
        return self._final_test(state)

    def _optimization(self, schedule_steps: int) -> Optimization:
        optimizer = build_optimizer(self.model, self.cfg.train)
        return Optimization(
            trainable_parameters(self.model), optimizer,
            linear_schedule(optimizer, schedule_steps, self.cfg.train.warmup_ratio),
            grad_scaler(self.precision, self.dist.device), self.precision, self.cfg.train.grad_clip,
            sync_gradients=self.cfg.scst and self.dist.world_size > 1,
        )  # fmt: skip

    def _step_fn(self, train_set: Any) -> Any:
        if not self.cfg.scst:
            forward_model = self.model
            if self.dist.world_size > 1:
                device_ids = [self.dist.device] if self.dist.device.type == "cuda" else None
                forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
            compiled = compile_forward(forward_model) if self.cfg.train.compile else None
            return XEStep(forward_model, self.dist.device, self.cfg.train, compiled)
        if self.cfg.train.compile:
            logger.warning("train.compile applies to XE's forward: SCST's decoding and scoring run eagerly")
        # From shards, each batch brings its references, and the document frequencies come from a file
        references = [] if isinstance(train_set, ShardTrainData) else [
            [strip_stop(clean_caption(c, self.cfg.data.max_words)) for c in e["caption"]] for e in train_set.entries
        ]  # fmt: skip
        eos = self.cfg.scst_opts.reward_eos
        cider = CiderD(self._document_frequency(references, eos), append_eos=eos)
        return ScstStep(
            self.model, self.tokenizer, cider, references, self.cfg.scst_opts, self.dist.device, self.cfg.train.seed,
        )  # fmt: skip

    def _document_frequency(self, references: list[list[str]], eos: bool) -> DocumentFrequency:
        """The reward's document frequencies: data.cider_df, or computed from the training references (and
        kept in the run folder). With ``eos`` they must count "<eos>", as the reward's sentences end in it."""
        path = Path(self.cfg.data.cider_df) if self.cfg.data.cider_df else self.run_dir / "cider_df.json.gz"
        if path.is_file():
            logger.info("CIDEr-D document frequencies from %s", path)
            df = DocumentFrequency.load(path)
            if eos and not df.counts_eos:
                raise ValueError(
                    f"{path} counts no '<eos>' n-grams, but the reward scores 'words <eos>' "
                    "(scst_opts.reward_eos): write it again with python -m data.prepare_coco, or set "
                    "--scst_opts.reward_eos false"
                )
            return df
        if self.cfg.data.train_shards:
            raise FileNotFoundError(
                f"data.cider_df {path} not found: SCST from shards reads the CIDEr-D document frequencies from a "
                f"file; write it with python -m data.shard_df --shards '{self.cfg.data.train_shards}' --out {path}"
            )
        df = DocumentFrequency.from_references(references, append_eos=eos)
        if self.dist.is_main:
            df.save(path)
            logger.info("CIDEr-D document frequencies of %d training images cached in %s", len(references), path)
        return df

    def _end_epoch(self, trainer: Trainer, val_set: CaptionImageDataset) -> EpochEnd:
        """Write last.pt, then validate: a failure in validation cannot lose the epoch's training. A stop
        request (signal or ``stop_after_steps``) ends the run before validating; a resume validates first."""
        state = trainer.state
        state.epoch += 1
        state.epoch_step = 0
        state.validation_pending = True
        self._report_skipped(state)
        self._save(trainer, self.run_dir / "last.pt")
        if trainer.stop.requested:
            return EpochEnd.SIGNAL
        if self.cfg.train.stop_after_steps and trainer.steps_this_run >= self.cfg.train.stop_after_steps:
            return EpochEnd.STEP_LIMIT
        self._validate_epoch(trainer, val_set)
        return EpochEnd.SIGNAL if trainer.stop.requested else EpochEnd.COMPLETE

    def _validate_epoch(self, trainer: Trainer, val_set: CaptionImageDataset) -> None:
        self._validate(trainer, val_set, f"validating epoch {trainer.state.epoch}")
        trainer.state.validation_pending = False
        self._save(trainer, self.run_dir / "last.pt")

    def _report_skipped(self, state: TrainState) -> None:
        """Log and record what training left out so far, and why."""
        dropped = self._dropped_entries
        if not self.dist.is_main or not (state.skipped_images or any(dropped.values())):
            return
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(state.skipped_by_reason.items()))
        logger.warning("%d unreadable training images skipped so far (%s); %s", state.skipped_images,
                       reasons or "no reason recorded", _describe(dropped, "annotation entries left out"))  # fmt: skip
        self.metrics.write("data", epoch=state.epoch, step=state.global_step, skipped_images=state.skipped_images,
                           skipped_by_reason=state.skipped_by_reason, dropped_entries=dropped)  # fmt: skip

    def _validate(self, trainer: Trainer, val_set: CaptionImageDataset, desc: str) -> None:
        """Score the validation split and keep best.pt. SCST also scores its starting checkpoint, so
        its best.pt is never worse on validation than the model it started from."""
        state = trainer.state
        options = self._decode_options(validation=True)
        try:
            report, captions = self._evaluate(val_set, options, False, desc, meteor=self.cfg.train.val_meteor)
        except Exception as err:
            kept = "last.pt holds the training so far" if state.global_step else "nothing was trained yet"
            raise ValidationError(
                f"{desc} failed ({type(err).__name__}: {_first_line(err)}); {kept}: fix the cause and run the "
                "same command with --resume"
            ) from err
        if self.dist.is_main:
            score = report.metrics["CIDEr"]
            self.metrics.write("val", epoch=state.epoch, step=state.global_step, **report.metrics,
                               **_diversity_scalars(report))  # fmt: skip
            self.metrics.text("val/samples", sample_table(captions, val_set.references))
            logger.info("epoch %d %s:\n%s", state.epoch, self.cfg.train.eval_split, report.format_table())
            warn_if_collapsed(report, self.cfg.train.collapse_warn, f"{desc} ({self.cfg.train.eval_split})")
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

    def _final_test(self, state: TrainState) -> RunResult:
        """Test split with the best checkpoint and test-time decoding; SPICE when available."""
        d = self.cfg.data
        best = self.run_dir / "best.pt"
        if best.is_file():
            load_state_strict(self.model, read_checkpoint(best)["model"], str(best))
        transform = build_transform(self.model.encoder.image_res)
        # Read from the images, never the feature cache (float16 by default), so that predict.py on best.pt
        # gives the same captions as test_predictions.json.
        test_set = CaptionImageDataset(d.test_file, d.image_root, transform, "test")
        report, captions = self._evaluate(test_set, self._decode_options(validation=False), True, "test")
        if not self.dist.is_main:
            return RunResult(state)
        self.metrics.write("test", **report.metrics, **_diversity_scalars(report))
        write_json(self.run_dir / "test_metrics.json", report.to_dict(), indent=2)
        results = [{"image_id": k, "caption": v} for k, v in captions.items()]
        write_json(self.run_dir / "test_predictions.json", results, indent=1)
        logger.info("test (best checkpoint, %d beams):\n%s", self.cfg.decode.beams, report.format_table())
        return RunResult(state, test=report.metrics, unavailable=report.unavailable, captions=captions)

    # ----- checkpoints --------------------------------------------------------------------------------
    def _save(self, trainer: Trainer | None, path: Path) -> None:
        """Rank 0 writes ``path``; with ``trainer`` (called on every process) the training state too, with
        every process's random state, so that dropout and drop path continue on each after a resume."""
        rng = distributed.gather_objects(_rng_state()) if trainer is not None else []
        if not self.dist.is_main:
            return
        train_state = None
        if trainer is not None:
            _check_finite(self.model, path, trainer.state)
            train_state = {
                "stage": self.stage,
                "counters": trainer.state.to_dict(),
                **trainer.optimization.state_dict(),
                "rng": rng[0],
                **({"rng_ranks": rng} if len(rng) > 1 else {}),
            }
        save_checkpoint(path, self.model, to_dict(self.cfg), architecture(self.model), train_state)

    def _resume(self, trainer: Trainer) -> None:
        """Optimizer, scheduler, scaler, counters and RNG from last.pt (its weights are already loaded)."""
        path, payload = self.run_dir / "last.pt", self._resume_payload
        self._resume_payload = None  # the copy of the weights is no longer needed
        state = payload["train_state"]
        trainer.optimization.load_state_dict(state)
        trainer.state = TrainState(**state["counters"])
        ranks = state.get("rng_ranks", [])
        if self.dist.is_main:
            _set_rng_state(state["rng"])
        elif len(ranks) == self.dist.world_size:
            _set_rng_state(ranks[self.dist.rank])
        else:  # a checkpoint of another number of processes (or of one without rng_ranks)
            seed_everything(self.cfg.train.seed + self.dist.rank + trainer.state.global_step)
        logger.info("resumed %s at epoch %d, step %d", path, trainer.state.epoch + 1, trainer.state.epoch_step)
        # later records of steps after this one replace those a killed run wrote before it stopped
        self.metrics.write("resume", epoch=trainer.state.epoch, step=trainer.state.global_step)

    def close(self) -> None:
        self.metrics.close()
        if self.scorer is not None and self._owns_scorer:
            self.scorer.close()
        distributed.cleanup()


def _check_finite(model: OPGCaptioner, path: Path, state: TrainState) -> None:
    """Never overwrite a good checkpoint with non-finite weights."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise FloatingPointError(
            f"non-finite weights after step {state.global_step} ({names}): {path} is not overwritten and keeps "
            "the last finite state"
        )


def _diversity_scalars(report: EvalReport) -> dict[str, float]:
    return report.diversity.scalars() if report.diversity is not None else {}


def warn_if_collapsed(report: EvalReport, threshold: float, where: str) -> None:
    """One warning when the share of distinct captions is below ``threshold`` (``train.collapse_warn``),
    naming the most repeated caption (PTB tokens) and how often it was written."""
    diversity = report.diversity
    if diversity is None or diversity.distinct_captions >= threshold:
        return
    logger.warning(
        "captions collapsing at %s: %d distinct captions for %d images (%.1f%%, below train.collapse_warn %g); "
        "the most repeated, %d times: '%s'", where, diversity.distinct, diversity.images,
        diversity.distinct_captions * 100, threshold, diversity.most_repeated_count, diversity.most_repeated,
    )  # fmt: skip


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _describe(counts: dict[str, int], what: str) -> str:
    parts = [f"{n} ({why})" for why, n in sorted(counts.items()) if n]
    return f"{what}: {', '.join(parts)}" if parts else f"no {what}"
