"""The CoAtNet family as data: layouts from the paper (Tables 3, 11, 12) and its reported costs.

A stage is a tuple of segments ``(block_type, width, depth)``; ``'C'`` is MBConv, ``'T'`` a
transformer block with 2-D relative attention. Most stages have one segment. CoAtNet-6/7 put two in
S3 (MBConv at one width, then transformer blocks at double that width): the first transformer block
changes the width without striding, through a projected shortcut (see ``blocks.TransformerBlock``).
"""

import dataclasses
from typing import Optional

Segment = tuple[str, int, int]  # (block type 'C' or 'T', output width, number of blocks)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One member of the family: the layout of S0..S4 and the attention head size."""

  stem_width: int  # S0: two 3x3 convolutions, the first with stride 2.
  stages: tuple[tuple[Segment, ...], ...]  # S1..S4, each halving the resolution in its first block.
  head_size: int  # Channels per attention head; heads = width // head_size.
  head_hidden: Optional[int] = None  # Width of the pre-logits layer; None means the S4 width.
  stem_hidden: Optional[int] = None  # Width of the first stem conv; None means ``stem_width``.

  @property
  def num_blocks(self) -> int:
    return sum(depth for stage in self.stages for _, _, depth in stage)

  @property
  def final_width(self) -> int:
    return self.stages[-1][-1][1]


def variant_from_data(fields) -> Variant:
  """A layout written as data (a config's ``model.extra_variants`` entry, or its JSON in a
  checkpoint, where tuples come back as lists); ``ValueError`` says what is malformed."""
  fields = dict(fields)
  known = {f.name for f in dataclasses.fields(Variant)}
  unknown = sorted(set(fields) - known)
  missing = sorted({'stem_width', 'stages', 'head_size'} - set(fields))
  if unknown or missing:
    raise ValueError(f'a layout has the fields {sorted(known)} ({", ".join(missing)} required)'
                     + (f'; unknown: {unknown}' if unknown else '') + '.')
  try:
    fields['stages'] = tuple(tuple((str(t), int(w), int(d)) for t, w, d in stage)
                             for stage in fields['stages'])
  except (TypeError, ValueError):
    raise ValueError(f'stages={fields["stages"]!r}: give a tuple of stages, each a tuple of '
                     f'(block type, width, depth) segments.') from None
  segments = [seg for stage in fields['stages'] for seg in stage]
  if (not all(fields['stages']) or
      any(t not in ('C', 'T') or w < 1 or d < 1 for t, w, d in segments)):
    raise ValueError(f'stages={fields["stages"]!r}: every stage needs a segment, every segment a '
                     f"block type 'C' or 'T' and a width and depth of at least 1.")
  return Variant(**fields)


def _cctt(stem, depths, widths, head_size, stem_hidden=None):
  """The plain C-C-T-T layout: one segment per stage."""
  types = ('C', 'C', 'T', 'T')
  return Variant(
      stem_width=stem,
      stages=tuple(((t, w, d),) for t, w, d in zip(types, widths, depths)),
      head_size=head_size,
      stem_hidden=stem_hidden,
  )


VARIANTS: dict[str, Variant] = {
    # A CPU-sized member for the quickstart and the tests: every block kind, a few 100K params.
    'coatnet_pico': _cctt(16, (1, 1, 2, 1), (16, 32, 64, 128), head_size=16),
    'coatnet_0': _cctt(64, (2, 3, 5, 2), (96, 192, 384, 768), head_size=32),
    'coatnet_1': _cctt(64, (2, 6, 14, 2), (96, 192, 384, 768), head_size=32),
    'coatnet_2': _cctt(128, (2, 6, 14, 2), (128, 256, 512, 1024), head_size=32),
    'coatnet_3': _cctt(192, (2, 6, 14, 2), (192, 384, 768, 1536), head_size=32),
    'coatnet_4': _cctt(192, (2, 12, 28, 2), (192, 384, 768, 1536), head_size=32),
    'coatnet_5': _cctt(192, (2, 12, 28, 2), (256, 512, 1280, 2048), head_size=64),
    'coatnet_6': Variant(
        stem_width=192,
        stages=((('C', 192, 2),), (('C', 384, 4),),
                (('C', 768, 8), ('T', 1536, 42)), (('T', 2048, 2),)),
        head_size=128),
    'coatnet_7': Variant(
        stem_width=192,
        stages=((('C', 256, 2),), (('C', 512, 4),),
                (('C', 1024, 8), ('T', 2048, 42)), (('T', 3072, 2),)),
        head_size=128),
    # timm's own layouts ('rw': Ross Wightman's, convert/timm.py has their switches); the stem's
    # first conv is half as wide, 32 channels per head throughout.
    'coatnet_pico_rw': _cctt(64, (2, 3, 5, 2), (64, 128, 256, 512), 32, stem_hidden=32),
    'coatnet_nano_rw': _cctt(64, (3, 4, 6, 3), (64, 128, 256, 512), 32, stem_hidden=32),
    'coatnet_0_rw': _cctt(64, (2, 3, 7, 2), (96, 192, 384, 768), 32, stem_hidden=32),
    'coatnet_1_rw': _cctt(64, (2, 6, 14, 2), (96, 192, 384, 768), 32, stem_hidden=32),
    'coatnet_2_rw': _cctt(128, (2, 6, 14, 2), (128, 256, 512, 1024), 32, stem_hidden=64),
    'coatnet_3_rw': _cctt(192, (2, 6, 14, 2), (192, 384, 768, 1536), 32, stem_hidden=96),
}

# The paper's figures (Tables 3 and 11-12): parameters, and multiply-adds ("FLOPs" in the paper) in
# GMACs at each input size where it reports one.
PAPER_PARAMS = {
    'coatnet_0': 25e6, 'coatnet_1': 42e6, 'coatnet_2': 75e6, 'coatnet_3': 168e6,
    'coatnet_4': 275e6, 'coatnet_5': 688e6, 'coatnet_6': 1.47e9, 'coatnet_7': 2.44e9,
}
PAPER_GMACS = {
    'coatnet_0': {224: 4.2, 384: 13.4},
    'coatnet_1': {224: 8.4, 384: 27.4},
    'coatnet_2': {224: 15.7, 384: 49.8, 512: 96.7},
    'coatnet_3': {224: 34.7, 384: 107.4, 512: 203.1},
    'coatnet_4': {384: 189.5, 512: 360.9},
    'coatnet_5': {512: 812.0},
    'coatnet_6': {512: 1521.0},
    'coatnet_7': {512: 2586.0},
}
