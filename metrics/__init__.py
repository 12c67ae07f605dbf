"""Captioning metrics: the CIDEr-D reward and its document frequencies, the COCO caption scorers."""
