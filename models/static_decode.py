"""A static KV cache for greedy decoding and sampling: one decode step with fixed shapes.

:class:`CachedPrefixLM` (Hugging Face's dynamic cache) grows its keys every step and drops finished rows,
so every step has new shapes, rebuilds its attention mask and pays Hugging Face's per-call Python work.
:class:`StaticPrefixLM` takes the cache after the prefix pass and copies it into buffers with a slot for
every position a caption can reach (``P + max_len - 1``); a step writes the new token's keys and values
into its slot, attends over the filled, kept slots, and keeps every row (finished ones run on unseen).
Its shapes never change, so on CUDA a step without gradients can be recorded once as a CUDA graph and
replayed (:class:`StepGraphs`): one launch per step instead of a few hundred.

The step is GPT-2's (``GPT2Block``: pre-norm attention and MLP, embedding dropout after the position
embedding, dropout on the attention probabilities and after each projection), computed with the model's
own modules, so their dropout rates and training flags apply as in the eager path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Model

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FastDecode:
    """Decode greedy and sampled captions with :class:`StaticPrefixLM`; beam search is unaffected.

    ``check_every``: test whether every row has finished every this many steps (each test waits for the
    device). ``cuda_graphs``: replay steps without gradients as CUDA graphs on CUDA (off by default until
    ``tests/test_cuda.py`` has passed on a GPU). Keep one instance per model and reuse it: it holds the
    recorded graphs."""

    check_every: int = 4
    cuda_graphs: bool = False
    graphs: StepGraphs = field(default_factory=lambda: StepGraphs(), repr=False)


def supports_static_cache(gpt: GPT2Model) -> bool:
    """Whether :class:`StaticPrefixLM` computes what ``gpt`` computes (no cross attention, no
    reordered/upcast attention, whose eager variant differs)."""
    config = gpt.config
    return not (config.add_cross_attention or config.reorder_and_upcast_attn)


class StaticPrefixLM:
    """GPT-2 over ``[prefix ; tokens]`` with a preallocated cache. Rows never leave; the step that feeds
    caption token ``t`` writes slot ``P + t`` (given as a one-element tensor, so that a recorded step
    serves every position).

    ``keys``/``values``: per layer R x H x S x d; ``keep``: R x S bool (True: a filled, kept slot);
    ``head``: output layer (weight V' x D, bias); ``embeddings``: V' x D input embeddings of the output
    vocabulary."""

    def __init__(
        self,
        transformer: GPT2Model,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        keep: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor | None],
        embeddings: torch.Tensor,
    ) -> None:
        self.transformer = transformer
        self.keys, self.values, self.keep = keys, values, keep
        self.head, self.embeddings = head, embeddings

    @classmethod
    def from_prefilled(
        cls,
        transformer: GPT2Model,
        cache: Any,
        keep: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor | None],
        embeddings: torch.Tensor,
        steps: int,
    ) -> StaticPrefixLM:
        """Copy a Hugging Face cache filled by the prefix pass (``cache.layers``, keys R x H x P x d) and its
        keep mask ``keep`` (R x P) into buffers with ``steps`` empty slots after the prefix (out of place,
        so gradients reach the prefix through its keys)."""
        layers = cache.layers
        rows, heads, _, head_dim = layers[0].keys.shape
        empty = layers[0].keys.new_zeros(rows, heads, steps, head_dim)
        keys = [torch.cat([layer.keys, empty], dim=2) for layer in layers]
        values = [torch.cat([layer.values, empty], dim=2) for layer in layers]
        keep = torch.cat([keep, keep.new_zeros(keep.shape[0], steps)], dim=1)
        return cls(transformer, keys, values, keep, head, embeddings)

    def signature(self) -> tuple:
        """What a recorded step depends on besides the buffers' contents."""
        k = self.keys[0]
        return (id(self.transformer), tuple(k.shape), k.dtype, len(self.keys), self.head[1] is None, k.device)

    def load_(self, other: StaticPrefixLM) -> None:
        """Copy ``other``'s cache, mask and output layer into this one's buffers (same signature)."""
        pairs = [*zip(self.keys, other.keys, strict=True), *zip(self.values, other.values, strict=True)]
        pairs.append((self.keep, other.keep))
        pairs += [(self.embeddings, other.embeddings), (self.head[0], other.head[0])]
        if self.head[1] is not None:
            pairs.append((self.head[1], other.head[1]))
        for mine, theirs in pairs:
            if mine.data_ptr() != theirs.data_ptr():
                mine.copy_(theirs)

    def step(self, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Feed each row's latest token (R) at position ``slot`` (1-element LongTensor); returns the
        next-token logits R x V', float32. Writes in place without gradients, out of place with them."""
        tf = self.transformer
        hidden = self.embeddings[tokens].unsqueeze(1) + tf.wpe(slot)
        hidden = tf.drop(hidden)
        self.keep.index_fill_(1, slot, True)
        hidden_mask = ~self.keep[:, None, None, :]
        for layer, block in enumerate(tf.h):
            attn_out = self._attention(block.attn, block.ln_1(hidden), layer, slot, hidden_mask)
            hidden = attn_out + hidden
            hidden = hidden + block.mlp(block.ln_2(hidden))
        hidden = tf.ln_f(hidden)
        return F.linear(hidden[:, -1], *self.head).float()

    def _attention(
        self, attn: torch.nn.Module, hidden: torch.Tensor, layer: int, slot: torch.Tensor, masked: torch.Tensor
    ) -> torch.Tensor:
        """GPT-2 self-attention of one new position (hidden R x 1 x D) over the slots of ``layer``."""
        query, key, value = attn.c_attn(hidden).split(attn.split_size, dim=2)
        heads = (hidden.shape[0], 1, attn.num_heads, attn.head_dim)
        query, key, value = (x.view(heads).transpose(1, 2) for x in (query, key, value))
        if torch.is_grad_enabled():
            self.keys[layer] = self.keys[layer].index_copy(2, slot, key)
            self.values[layer] = self.values[layer].index_copy(2, slot, value)
        else:
            self.keys[layer].index_copy_(2, slot, key)
            self.values[layer].index_copy_(2, slot, value)
        keys, values = self.keys[layer], self.values[layer]
        scores = torch.matmul(query, keys.mT) * attn.scaling  # R x H x 1 x S
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).type(values.dtype)
        probs = F.dropout(probs, p=attn.attn_dropout.p, training=attn.training)
        # One query position: R x H x 1 x d is already laid out as R x 1 x (H d).
        out = torch.matmul(probs, values).reshape(hidden.shape[0], 1, -1)
        return attn.resid_dropout(attn.c_proj(out))


def dropout_active(module: torch.nn.Module) -> bool:
    """Whether any dropout in ``module`` would change its output (training mode and a rate above 0)."""
    return any(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in module.modules())


class StepGraphs:
    """CUDA graphs of :meth:`StaticPrefixLM.step`, one per signature, reused across decodes.

    The first decode of a signature records its step; later ones copy their cache into the recorded
    buffers (:meth:`StaticPrefixLM.load_`) and replay. Weights are read where they live, so optimizer
    steps (in place) are seen; autocast runs without its weight cache while recording, as CUDA graphs
    require. Recording is refused (with one warning) on any error, and the step then runs eagerly."""

    def __init__(self) -> None:
        self._recorded: dict[tuple, tuple[StaticPrefixLM, StepFn | None]] = {}

    def step_fn(self, lm: StaticPrefixLM) -> StepFn:
        """A step function equal to ``lm.step`` (its buffers hold the cache the steps build on)."""
        key = (lm.signature(), _autocast_state())
        if key not in self._recorded:
            self._recorded[key] = (lm, None)
            return self._recording(lm, key)
        recorded, replay = self._recorded[key]
        if replay is None:
            return lm.step
        recorded.load_(lm)
        return replay

    def _recording(self, lm: StaticPrefixLM, key: tuple) -> StepFn:
        """A step function that records the graph at its first call, then replays it."""
        replay: StepFn | None = None

        def step(tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
            nonlocal replay
            if replay is None:
                try:
                    replay = _record(lm, tokens, slot)
                except RuntimeError as error:
                    logger.warning("CUDA graph recording failed (%s); decoding steps run eagerly", error)
                    replay = lm.step
                    return lm.step(tokens, slot)
                self._recorded[key] = (lm, replay)
            return replay(tokens, slot)

        return step


def _autocast_state() -> tuple:
    if not torch.is_autocast_enabled("cuda"):
        return (False,)
    return (True, torch.get_autocast_dtype("cuda"))


def _record(lm: StaticPrefixLM, tokens: torch.Tensor, slot: torch.Tensor) -> StepFn:
    """Record ``lm.step`` as a CUDA graph with static input buffers; returns its replay function, whose
    result stays valid until the next replay. Recording writes the step's slot, as the step itself would."""
    static_tokens, static_slot = tokens.clone(), slot.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), _autocast_without_cache():
        lm.step(static_tokens, static_slot)  # warm-up: lazy initialisation must not happen while recording
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with _autocast_without_cache(), torch.cuda.graph(graph):
        logits = lm.step(static_tokens, static_slot)

    def replay(new_tokens: torch.Tensor, new_slot: torch.Tensor) -> torch.Tensor:
        static_tokens.copy_(new_tokens)
        static_slot.copy_(new_slot)
        graph.replay()
        return logits

    return replay


def _autocast_without_cache() -> contextlib.AbstractContextManager:
    """The current CUDA autocast setting with its cast cache off (cached casts would freeze weights)."""
    state = _autocast_state()
    if not state[0]:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=state[1], cache_enabled=False)
