r"""Input-pipeline speed on this host: images per second per CPU core, all figures from one run.

  python -m benchmarks.input_pipeline [--images 300] [--size 224] [--seconds 12] [--rounds 6] \
      [--quality 98] [--train_images_per_sec 2500]

Builds ``--images`` JPEGs of ImageNet-like sizes (around 500x375) from the two photos that
scikit-learn ships, keeps them in memory, and measures on ONE core (tf.data private thread pool of
1, intra-op parallelism 1, so the figures are per core and add up across cores).

Decoding time grows with the bytes to entropy-decode, so the files should be as dense as
ImageNet's, not just as large in pixels: ImageNet-1K's train files average 113 KiB (147.9 GB in
1,281,167 files). The two photos are smooth and were JPEG-compressed before, so at quality 90 they
give only about 50 KiB (0.27 bytes per pixel), which decodes about 1.5x faster than ImageNet-dense
files and flatters (a); quality 98 gives about 102 KiB (0.55 bytes per pixel), the default.
``mean_kb`` and ``bytes_per_pixel`` are printed, and ``--quality 90`` measures the sparse set.
Measured:
  (a) decode only:       tf.io.decode_jpeg of the whole image
  (a') decode + resize:  (a), then the bilinear resize to --size: the least work that gives a
                         model input (b_over_a_resize, for reference; the goal is on (a))
  (b) train transform:   Inception crop (decoding only the crop window), flip, resize to --size,
                         RandAugment 2/15 (coatnet_jax.data.streams.train_transform)
  (c) eval transform:    centre crop 0.875 and resize to --size
and the ratio (b)/(a) (the goal is >= 0.6). Images per second are per CPU second of this process
(``time.process_time``), so other load on the host slows the figures less; elements are taken in
batches of 32, as the trainer does, so Python's per-element cost stays out of them. The
measurements alternate over ``--rounds`` rounds of ``--seconds / --rounds`` each; each figure
is the median of its rounds, and each ratio the median of its per-round ratios (a round's figures
share the host's state of that moment, so drifts of the VM cancel; ``b_over_a_range`` gives the
lowest and highest round). With ``--train_images_per_sec`` (e.g. the img/s that
benchmarks/train_throughput.py measures for CoAtNet-0 on the GPU), it also prints the cores that
(b) needs to keep up. The last line is one JSON object.
"""

import argparse
import io
import json
import os
import sys
import time

if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top


def make_jpegs(n, seed=0, quality=98):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = [Image.fromarray(p) for p in load_sample_images().images]  # 427x640 each.
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = photos[i % len(photos)]
    w, h = int(rng.integers(440, 560)), int(rng.integers(330, 420))
    if rng.random() < 0.3:
      w, h = h, w  # Some portrait images, as in ImageNet.
    cw, ch = int(rng.integers(300, p.width)), int(rng.integers(250, p.height))
    x, y = int(rng.integers(0, p.width - cw + 1)), int(rng.integers(0, p.height - ch + 1))
    img = p.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, 'JPEG', quality=quality)
    out.append(buf.getvalue())
  return out


def pipeline(tf, jpegs, fn, with_seed=False):
  """An endless iterator of batches of ``fn``'s outputs on one core (one tf.data thread)."""
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  if with_seed:
    ds = ds.map(lambda i, b: fn(b, tf.stack([tf.constant(0, tf.int64), i])))
  else:
    ds = ds.map(lambda i, b: fn(b))
  ds = ds.map(lambda x: tf.reduce_sum(tf.cast(x[:1, :1], tf.int32)))  # Force, but keep it cheap.
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  it = iter(ds.batch(BATCH).with_options(options))
  for _ in range(2):  # Warm up (tracing, caches).
    next(it)
  return it


BATCH = 32


def measure(it, seconds):
  """Images per CPU second of ``it`` over about ``seconds``."""
  n, t0 = 0, time.process_time()
  while time.process_time() - t0 < seconds:
    next(it)
    n += BATCH
  return n / (time.process_time() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--images', type=int, default=300)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--seconds', type=float, default=12.0, help='per figure, all rounds')
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--quality', type=int, default=98,
                      help='JPEG quality of the generated files (98: ImageNet-1K bytes per image)')
  parser.add_argument('--ra', default='2,15', help='RandAugment N,M for (b)')
  parser.add_argument('--train_images_per_sec', type=float, default=0.0,
                      help='the train step rate to feed (img/s), e.g. from train_throughput.py')
  args = parser.parse_args()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from coatnet_jax.data import streams  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top

  jpegs = make_jpegs(args.images, quality=args.quality)
  shapes = np.array([tf.image.extract_jpeg_shape(j).numpy()[:2] for j in jpegs])
  n_layers, magnitude = (int(v) for v in args.ra.split(','))
  results = {
      'images': len(jpegs), 'mean_hw': shapes.mean(0).round().astype(int).tolist(),
      'quality': args.quality,
      'mean_kb': round(float(np.mean([len(j) for j in jpegs])) / 1024, 1),
      'bytes_per_pixel': round(sum(len(j) for j in jpegs) / float(shapes.prod(1).sum()), 3),
      'size': args.size,
      'randaugment': [n_layers, magnitude],
  }
  pipelines = {
      'a_decode_per_core': pipeline(tf, jpegs, lambda b: tf.io.decode_jpeg(b, channels=3)),
      'a_decode_resize_per_core': pipeline(tf, jpegs, lambda b: transforms.resize(
          tf.io.decode_jpeg(b, channels=3), args.size, 'bilinear', antialias=False)),
      'b_train_per_core': pipeline(tf, jpegs, lambda b, s: streams.train_transform(
          b, s, image_size=args.size, randaugment_layers=n_layers,
          randaugment_magnitude=magnitude), with_seed=True),
      'b_train_no_ra_per_core': pipeline(
          tf, jpegs, lambda b, s: streams.train_transform(b, s, image_size=args.size),
          with_seed=True),
      'c_eval_per_core': pipeline(tf, jpegs, lambda b: transforms.eval_image(b, args.size, 0.875)),
  }
  rounds = {k: [] for k in pipelines}
  for _ in range(args.rounds):
    for k, it in pipelines.items():
      rounds[k].append(measure(it, args.seconds / args.rounds))
  results.update({k: float(np.median(v)) for k, v in rounds.items()})
  train = np.array(rounds['b_train_per_core'])
  over_a = train / np.array(rounds['a_decode_per_core'])
  results['b_over_a'] = float(np.median(over_a))
  results['b_over_a_range'] = [round(float(over_a.min()), 3), round(float(over_a.max()), 3)]
  results['b_over_a_resize'] = float(np.median(train / np.array(rounds['a_decode_resize_per_core'])))
  if args.train_images_per_sec:
    results['train_images_per_sec'] = args.train_images_per_sec
    results['cores_to_feed'] = args.train_images_per_sec / results['b_train_per_core']
  for k, v in results.items():
    print(f'{k:>24}: {v:.1f}' if isinstance(v, float) else f'{k:>24}: {v}')
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == '__main__':
  main()
