"""The one size limit for image files, read from the header before anything is decoded.

Applied where image files come from a user or a download: class folders (training and
``evaluate`` list them through the same source), the ImageNet-21K builder and ``predict``. A file
above a limit is refused like an undecodable one (skipped and counted when a dataset is listed or
built, one ``error:`` line in ``predict``), so a small file that declares a huge image (a 1.2 MB
PNG of 20000x20000 decodes to 1.2 GB of RGB) never reaches a decoder.

  MAX_PIXELS      width x height <= 50,000,000 (8660x5773; 150 MB as RGB uint8)
  MAX_FILE_BYTES  one image file or archive member <= 64 MiB, checked from its declared size
"""

import io
import warnings
from typing import Optional

from PIL import Image

from coatnet_jax import errors

MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 64 * 2**20
# The image formats read everywhere (TF's decode_image decodes each of them, by content).
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')


def too_large(source) -> Optional[str]:
  """Why ``source`` (bytes or a binary file object) is refused, or None: its header alone.

  A file whose header PIL cannot read is not refused here; the decoder decides about it.
  """
  fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(fileobj) as img:
        width, height = img.size
  except Image.DecompressionBombError as e:  # PIL's own limit, far above ours.
    return (f'{errors.one_line(e)}; the limit is {MAX_PIXELS:,} pixels '
            f'(coatnet_jax.data.image_limits)')
  except Exception:  # pylint: disable=broad-except
    return None
  if width * height > MAX_PIXELS:
    return (f'{width}x{height} = {width * height:,} pixels, above the limit of {MAX_PIXELS:,} '
            f'(coatnet_jax.data.image_limits)')
  return None


def too_many_bytes(size: int, limit: int = MAX_FILE_BYTES) -> Optional[str]:
  """Why a file of ``size`` bytes is refused, or None; ``limit`` lower only to test the refusal."""
  if size > limit:
    return (f'{size:,} bytes, above the limit of {limit:,} per image '
            f'(coatnet_jax.data.image_limits)')
  return None
