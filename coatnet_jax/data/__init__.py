"""Dataset sources, builders and transforms behind ``coatnet_jax.input_pipeline``.

One module per concern. source.py, digits.py, tf_source.py and image_limits.py import no
TensorFlow; every other module imports it at its top, so ``tf_source`` imports them only when a TF
source first reads data: the quickstart, the model, the step and export never load TensorFlow.

  source.py       the contract every source implements (DataSource), DatasetInfo (no TF)
  digits.py       sklearn's digits in memory, the quickstart's source (no TF)
  tf_source.py    the TF sources' shared implementation of the contract over a record Reader
                  (imports TF only when data is first read)
  image_limits.py the one pixel and byte limit per image file (PIL only)
  transforms.py   decode, Inception crop, flip, eval resize/crop (TF, stateless, per-example seeds)
  randaugment.py  RandAugment(N, M), the TF EfficientNet operation list, stateless
  streams.py      the deterministic (seed, epoch, position) train stream and exact padded eval
  tfds_source.py  any TFDS dataset read by file instructions (imagenet2012, imagenet21k, ...)
  tfrecords.py    JFT-style multi-label TFRecords read by glob (schema in its docstring)
  folders.py      a directory of class sub-folders
  imagenet21k.py  the TFDS builder for the ImageNet-21K release (fall11 / winter21)
  prepare.py      ``python -m coatnet_jax.data.prepare NAME``: a TFDS builder from its manual files
"""

from coatnet_jax import errors


class DataNotFoundError(errors.UserError, FileNotFoundError):
  """A dataset that is missing, empty or unprepared. The message is one line that names the path
  and the command that prepares it; ``main`` can print it alone instead of a traceback."""
