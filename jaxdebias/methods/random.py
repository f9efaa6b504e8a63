"""Random pruning, the baseline token-pruning papers report beside the attention methods (ours: no release).

Before the decoder, each sample keeps ``keep`` of its N visual tokens drawn uniformly at random without
replacement, in raster order, and the decoder sees them at contiguous positions (as every encoder-side method
here); decoding continues from its caches. The draw is seeded per image: the key folds the option ``seed`` with a
hash of the image's pixels, so an image keeps the same set whatever batch, question or answer it comes with. Nothing is scored, so
debiasing does not apply (a spec that asks for it is refused).

``keep`` counts the visual tokens the decoder receives.

Axes: B batch, N visual tokens, K kept.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxdebias.methods.base import Block, EncoderInputs, EncoderStage, Method, no_stages
from jaxdebias.prune import gather_tokens, select_topk


@dataclasses.dataclass(frozen=True)
class Draw(EncoderStage):
    """``size`` uniformly random tokens per sample (the best ``limit`` of the bucket's slots valid)."""

    seed: int = 0
    count: int = 0  # the real budget (<= size, the bucketed shape)

    @property
    def budget(self) -> int:
        return self.count

    def shaped(self, bucketed):
        return dataclasses.replace(self, size=bucketed(self.count, None))

    def check(self, n: int, method: str) -> None:
        if self.count > n:
            raise ValueError(f"{method}: keep={self.count} exceeds the {n} visual tokens.")

    def encode(self, inp: EncoderInputs) -> Block:
        feats = inp.tower(inp.pixels)  # [B, N, Dv]
        u = uniform(inp.sample_key, self.seed, inp.n)
        idx, slot = select_topk(u, self.size, valid=inp.candidates, limit=inp.limit)
        return Block(gather_tokens(feats, idx), slot, idx)


def uniform(sample_key, seed: int, n: int):
    """float32[B, n] uniforms, one stream per sample: key(seed) folded with the sample's uint32 key."""
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.key(seed), k))(sample_key)
    return jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)


def encoder(keep: int, n: int, options: dict) -> EncoderStage:
    return Draw(keep, int(options["seed"]), keep)


METHOD = Method("random", "ours (the usual random-pruning baseline)", no_stages, encoder=encoder,
                budget="visual tokens the decoder receives", positions="reindex", pad_candidates=True,
                debias=False, options=(("seed", 0),))
