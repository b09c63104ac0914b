"""Relative positions on a grid: the (query, key) -> table-entry index every relative bias is
gathered with, and timm's relative-position MLP (the bias of its ``rmlp`` models, any grid size).

Instead of a trainable table per head, a two-layer MLP (2 -> hidden, ReLU, -> heads) maps each
relative offset (dy, dx), as sign(d) * log(1 + |d|), to one bias per head (timm's ``RelPosMlp``,
mode 'cr'). It has no size of its own, so the same weights serve 224, 384 or a non-square input
without resizing. Its output is gathered exactly as the paper's table is (``relative_index``).
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def relative_index(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column indices into a (2H-1, 2W-1) table for every (query, key) pair, row-major.

  Query (i, j) and key (i', j') read entry (i - i' + H - 1, j - j' + W - 1).
  """
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  i, j = i.reshape(-1), j.reshape(-1)
  return i[:, None] - i[None, :] + height - 1, j[:, None] - j[None, :] + width - 1


def log_coords(height: int, width: int) -> np.ndarray:
  """(2H-1, 2W-1, 2) float32 offsets (dy, dx) from -(H-1) to H-1, as sign(d) * log(1 + |d|)."""
  dy, dx = np.meshgrid(np.arange(1 - height, height, dtype=np.float32),
                       np.arange(1 - width, width, dtype=np.float32), indexing='ij')
  d = np.stack([dy, dx], axis=-1)
  return (np.sign(d) * np.log1p(np.abs(d))).astype(np.float32)


class RelPosMlp(nn.Module):
  """Returns the per-head bias of an HxW grid as a float32 (heads, H*W, H*W) array.

  timm drops 12.5% of the hidden units while training (``deterministic=False`` does the same).
  """

  heads: int
  hidden: int
  dropout: float = 0.125

  @nn.compact
  def __call__(self, height: int, width: int, deterministic: bool = True):
    y = nn.Dense(self.hidden, kernel_init=nn.initializers.xavier_uniform(), name='fc1')(
        jnp.asarray(log_coords(height, width)))
    y = nn.Dropout(self.dropout, deterministic=deterministic)(nn.relu(y))
    table = nn.Dense(self.heads, kernel_init=nn.initializers.xavier_uniform(), name='fc2')(y)
    rows, cols = relative_index(height, width)
    return jnp.moveaxis(table[rows, cols], -1, 0).astype(jnp.float32)
