"""CIDEr-D document frequencies of a training split held in WebDataset shards, for SCST from shards.

    python -m data.shard_df --shards "datasets/cc3m/{00000..00331}.tar" --out datasets/cc3m/cider_df.json.gz
    python train_scst.py --scst=True --checkpoint runs/cc3m_xe/best.pt \
        --data.train_shards "datasets/cc3m/{00000..00331}.tar" --data.cider_df datasets/cc3m/cider_df.json.gz

One document per sample: its references (the ``json``'s ``caption``, a string or a list, else ``txt``),
cleaned and ended with ``<eos>`` as the SCST reward scores them, as ``data.prepare_coco`` counts the
references of ``train.json``. Only the text members are used; no image is decoded. A shard that cannot be
read stops the command with its name; samples without a caption are counted and left out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from data.shards import ShardError, expand_shards, read_shard, sample_captions
from data.text import clean_caption, strip_stop
from metrics.cider_df import DocumentFrequency
from utils.cli import ArgumentParser
from utils.progress import progress

logger = logging.getLogger(__name__)


def shard_references(shards: list[str]) -> Iterator[list[str]]:
    """The cleaned references of every sample with a caption, shard by shard."""
    without = 0
    for sample in progress((s for shard in shards for s in read_shard(shard)), desc="reading shards", unit="sample"):
        if "__bad__" in sample:
            raise ShardError(sample["__bad__"])
        references = [strip_stop(clean_caption(c)) for c in sample_captions(sample)]
        references = [r for r in references if r]
        if references:
            yield references
        else:
            without += 1
    if without:
        logger.warning("%d samples without a caption left out", without)


def document_frequency(spec: str) -> tuple[DocumentFrequency, int]:
    """The document frequencies of the shards' references (counting ``<eos>``) and the samples counted."""
    references = list(shard_references(expand_shards(spec)))
    if not references:
        raise ShardError(f"{spec}: no sample with a caption")
    return DocumentFrequency.from_references(references, append_eos=True), len(references)


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    parser = ArgumentParser(prog="python -m data.shard_df", description=__doc__)
    parser.add_argument("--shards", required=True, help="shard files: brace notation, several joined by ::")
    parser.add_argument("--out", type=Path, required=True, help="document-frequency file (.json.gz) to write")
    return parser.parse(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        df, count = document_frequency(args.shards)
        df.save(args.out)
    except (ShardError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"CIDEr-D document frequencies of {count} samples written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
