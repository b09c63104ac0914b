"""The ImageNet-21K builder on tiny fake releases: both layouts, real JPEG bytes, a corrupt image,
a CMYK JPEG, PNG bytes in a .JPEG name, the held-out rule, and a malicious archive."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from coatnet_jax import input_pipeline
from coatnet_jax.data import DataNotFoundError
from coatnet_jax.data import imagenet21k
import hostile_files

tf.config.set_visible_devices([], 'GPU')

SYNSETS = ('n01440764', 'n01443537', 'n02084071')


class TinyIn21k(imagenet21k.Imagenet21k):
  """The real builder with a held-out share large enough for 12 images."""
  held_out_per_mille = 250


class TinyLimitIn21k(TinyIn21k):
  """With a file limit of 60,000 bytes: a 2 GiB member, scaled down."""
  max_file_bytes = 60_000


def _jpeg(seed, mode='RGB', fmt='JPEG'):
  rng = np.random.default_rng(seed)
  h, w = rng.integers(30, 60, 2)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).convert(mode).save(buf, fmt)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _synset_tar(synset, evil=False):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w') as t:
    for i in range(4):
      data = _jpeg(hash((synset, i)) % 1000)
      if synset == SYNSETS[0] and i == 1:
        data = data[:150]  # Truncated: skipped and counted.
      if synset == SYNSETS[1] and i == 2:
        data = _jpeg(7, mode='CMYK')  # Converted to RGB.
      if synset == SYNSETS[2] and i == 3:
        data = _jpeg(8, fmt='PNG')  # PNG bytes, .JPEG name: converted.
      _add(t, f'{synset}_{i}.JPEG', data)
    if evil:
      _add(t, '../evil.JPEG', _jpeg(9))
      _add(t, '/abs/evil.JPEG', _jpeg(10))
      link = tarfile.TarInfo('link.JPEG')
      link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
      t.addfile(link)
  return buf.getvalue()


def _release(root, layout, evil=False):
  os.makedirs(root, exist_ok=True)
  if layout == 'synset_tars':
    for s in SYNSETS:
      (root / f'{s}.tar').write_bytes(_synset_tar(s, evil and s == SYNSETS[0]))
  else:
    with tarfile.open(root / 'winter21_whole.tar.gz', 'w:gz') as t:
      for s in SYNSETS:
        _add(t, f'winter21_whole/{s}.tar', _synset_tar(s, evil and s == SYNSETS[0]))
      if evil:
        _add(t, '../../outside.tar', _synset_tar('n09999999'))
  return str(root)


def _prepare(tmp_path, layout, evil=False):
  manual = _release(tmp_path / 'release', layout, evil)
  data_dir = str(tmp_path / 'data')
  b = TinyIn21k(data_dir=data_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return b, data_dir


def _examples(b, split):
  return [(int(e['label']), e['file_name'].decode()) for e in
          tfds.as_numpy(b.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()}))]


@pytest.mark.parametrize('layout', ['synset_tars', 'outer_archive'])
def test_builder_both_layouts(tmp_path, layout):
  b, data_dir = _prepare(tmp_path, layout)
  meta = b.info.metadata
  assert meta['num_classes'] == 3 and meta['release'] == 'unknown (3 classes)'
  assert meta['skipped'] == [f'{SYNSETS[0]}/{SYNSETS[0]}_1.JPEG']
  assert meta['converted'] == 2 and not meta['refused_members']
  assert b.info.features['label'].names == list(SYNSETS)
  train, val = _examples(b, 'train'), _examples(b, 'validation')
  assert len(train) + len(val) == 11
  want_val = sorted(f'{s}_{i}.JPEG' for s in SYNSETS for i in range(4)
                    if imagenet21k.held_out(f'{s}_{i}.JPEG', 250)
                    and f'{s}_{i}' != f'{SYNSETS[0]}_1')
  assert sorted(n for _, n in val) == want_val and val
  for label, name in train + val:
    assert name.startswith(SYNSETS[label])
  # Every image decodes to RGB through the pipeline's decoder; the metadata is on disk.
  for e in tfds.as_numpy(b.as_dataset(split='train')):
    assert e['image'].shape[-1] == 3
  with open(os.path.join(b.data_dir, 'metadata.json')) as f:
    assert json.load(f)['converted'] == 2
  # And the training pipeline reads it by name.
  c = common.get_base_config().data
  c.update(dict(name='tiny_in21k', data_dir=data_dir, image_size=32, shuffle_buffer=4))
  info = input_pipeline.get_info(c)
  assert (info.num_classes, info.train_size, info.eval_size) == (3, len(train), len(val))
  assert next(input_pipeline.train_iterator(c, 2, seed=0))['image'].shape == (2, 32, 32, 3)


@pytest.mark.parametrize('layout', ['synset_tars', 'outer_archive'])
def test_malicious_members_are_refused_and_nothing_is_written(tmp_path, layout):
  b, _ = _prepare(tmp_path, layout, evil=True)
  refused = b.info.metadata['refused_members']
  assert any('../evil.JPEG' in r for r in refused) and any('/abs/evil.JPEG' in r for r in refused)
  assert any('link.JPEG' in r for r in refused)
  if layout == 'outer_archive':
    assert any('outside.tar' in r for r in refused)
  names = [n for _, n in _examples(b, 'train') + _examples(b, 'validation')]
  assert not any('evil' in n or 'link' in n for n in names)
  assert b.info.metadata['num_classes'] == 3  # n09999999 came only from the refused member.
  assert not (tmp_path / 'evil.JPEG').exists() and not (tmp_path.parent / 'evil.JPEG').exists()
  assert not os.path.exists('/abs/evil.JPEG')


def test_held_out_rule_is_fixed_and_about_point_eight_percent():
  names = [f'n0{i:07d}_{j}.JPEG' for i in range(200) for j in range(100)]
  share = np.mean([imagenet21k.held_out(n) for n in names])
  assert 0.006 < share < 0.010
  assert imagenet21k.held_out('n01440764_10026.JPEG') == imagenet21k.held_out(
      'some/dir/n01440764_10026.JPEG')


def test_missing_release_is_one_line(tmp_path):
  for d in (str(tmp_path / 'nope'), str(tmp_path)):
    with pytest.raises(DataNotFoundError) as e:
      imagenet21k.Release(d)
    assert '\n' not in str(e.value) and d in str(e.value) and 'coatnet_jax.data.imagenet21k' in str(
        e.value)
def test_hostile_release_is_skipped_counted_and_named(tmp_path):
  root = tmp_path / 'release'
  os.makedirs(root)
  for s in SYNSETS:
    buf = io.BytesIO(_synset_tar(s, evil=s == SYNSETS[0]))
    with tarfile.open(fileobj=buf, mode='a') as t:
      if s == SYNSETS[1]:
        _add(t, f'{s}_huge.JPEG', b'\0' * 70_000)  # Declared above the limit: never read.
      if s == SYNSETS[2]:
        _add(t, f'{s}_bomb.JPEG', hostile_files.png_header(20000, 20000))  # Above the pixel limit.
    (root / f'{s}.tar').write_bytes(buf.getvalue())
  (root / 'n00000001.tar').write_bytes(b'')  # Empty.
  (root / 'n00000002.tar').write_bytes(b'garbage ' * 200)  # Corrupt.
  whole = _synset_tar('n00000003')  # Truncated in its third image: the first two are kept.
  with tarfile.open(fileobj=io.BytesIO(whole)) as t:
    cut = t.getmembers()[2].offset_data + 10
  (root / 'n00000003.tar').write_bytes(whole[:cut])
  os.mkfifo(root / 'n00000004.tar')  # Would block a reader forever.
  empty = io.BytesIO()
  with tarfile.open(fileobj=empty, mode='w') as t:
    d = tarfile.TarInfo('folder')
    d.type = tarfile.DIRTYPE
    t.addfile(d)
  (root / 'n00000005.tar').write_bytes(empty.getvalue())  # No image member: not a class.
  b = TinyLimitIn21k(data_dir=str(tmp_path / 'data'))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  meta = b.info.metadata
  assert b.info.features['label'].names == sorted(SYNSETS + ('n00000003',))
  bad = {os.path.basename(k): v for k, v in meta['bad_archives'].items()}
  assert sorted(bad) == ['n00000001.tar', 'n00000002.tar', 'n00000003.tar', 'n00000004.tar']
  assert bad['n00000004.tar'] == 'not a regular file' and 'ReadError' in bad['n00000003.tar']
  assert meta['empty_synsets'] == ['n00000005']
  assert sorted(meta['too_large']) == [f'{SYNSETS[1]}/{SYNSETS[1]}_huge.JPEG',
                                       f'{SYNSETS[2]}/{SYNSETS[2]}_bomb.JPEG']
  assert len(meta['refused_members']) == 3 == len(set(meta['refused_members']))
  names = [n for _, n in _examples(b, 'train') + _examples(b, 'validation')]
  assert sorted(n for n in names if n.startswith('n00000003')) == ['n00000003_0.JPEG',
                                                                  'n00000003_1.JPEG']
  assert len(names) == 11 + 2
  with open(os.path.join(b.data_dir, 'metadata.json')) as f:
    assert json.load(f)['empty_synsets'] == ['n00000005']
