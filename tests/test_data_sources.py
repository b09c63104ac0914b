"""Class folders and JFT-style TFRecords: bit-exact resume (hashing batches), per-process parts,
exact evaluation, multi-hot labels, undecodable images, one-line errors for missing data."""

import hashlib
import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import common
from coatnet_jax import input_pipeline
from coatnet_jax.data import DataNotFoundError
from coatnet_jax.data import folders
from coatnet_jax.data import tfrecords
import hostile_files

tf.config.set_visible_devices([], 'GPU')


def _photos(n, seed=0):
  """``n`` real-photo crops of varied sizes, from the two JPEGs scikit-learn ships."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  for i in range(n):
    p = photos[i % 2]
    h, w = rng.integers(40, 90, 2)
    y, x = rng.integers(0, p.shape[0] - h), rng.integers(0, p.shape[1] - w)
    yield p[y:y + h, x:x + w]


def _encode(array, fmt='JPEG', mode='RGB'):
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, fmt)
  return buf.getvalue()


def _digest(batches):
  h = hashlib.sha256()
  for b in batches:
    for k in sorted(b):
      h.update(k.encode())
      h.update(np.ascontiguousarray(b[k]).tobytes())
  return h.hexdigest()


@pytest.fixture(scope='module')
def folder_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('folders')
  photos = list(_photos(31))
  for split, count in (('train', 24), ('val', 7)):
    for i in range(count):
      c = f'class_{(i % 3)}'
      os.makedirs(root / split / c, exist_ok=True)
      data = _encode(photos[i if split == 'train' else 24 + i])
      if split == 'train' and i == 4:
        data = _encode(photos[i], mode='CMYK')  # A CMYK JPEG (ImageNet has 22 of them).
      if split == 'train' and i == 5:
        data = _encode(photos[i], fmt='PNG')  # PNG bytes in a .JPEG name.
      (root / split / c / f'img_{i:03d}.JPEG').write_bytes(data)
  # A truncated JPEG: undecodable, skipped and logged.
  (root / 'train' / 'class_0' / 'zz_truncated.JPEG').write_bytes(_encode(photos[0])[:300])
  return str(root)


def _data_config(**kw):
  """The base config's data fields, with ``kw`` set."""
  c = common.get_base_config().data
  c.update(kw)
  return c


def _folder_config(root, **kw):
  c = _data_config(
      name='folders', data_dir=root, train_split='train', eval_split='val', image_size=32,
      crop_fraction=0.875, shuffle_buffer=8, randaugment={'num_layers': 2, 'magnitude': 15})
  c.update(kw)
  return c


def test_folders_info_and_decoding(folder_root):
  c = _folder_config(folder_root)
  info = input_pipeline.get_info(c)
  assert (info.num_classes, info.train_size, info.eval_size) == (3, 24, 7)
  assert info.skipped_images == 1  # The truncated JPEG; the CMYK and PNG ones decode.
  b = next(input_pipeline.train_iterator(c, 8, seed=0))
  assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.uint8
  assert b['label'].dtype == np.int32


def test_folders_resume_is_bit_exact_across_epochs(folder_root):
  c = _folder_config(folder_root)
  # 24 usable files, batch 8: the stream crosses two epoch boundaries within 8 steps.
  full = input_pipeline.train_iterator(c, 8, seed=7)
  uninterrupted = [next(full) for _ in range(8)]
  for k in (3, 5):
    resumed = input_pipeline.train_iterator(c, 8, seed=7, start_step=k)
    assert _digest([next(resumed) for _ in range(8 - k)]) == _digest(uninterrupted[k:]), k
  other = input_pipeline.train_iterator(c, 8, seed=8)
  assert _digest([next(other)]) != _digest(uninterrupted[:1])


def test_folders_two_processes_read_disjoint_parts(folder_root):
  c = _folder_config(folder_root, randaugment={'num_layers': 0, 'magnitude': 0})
  seen = []
  for p in range(2):
    it = input_pipeline.train_iterator(c, 8, seed=0, process_index=p, process_count=2)
    batches = [next(it) for _ in range(3)]  # 12 = one epoch of this process's 12 or 13 files.
    assert all(b['image'].shape == (4, 32, 32, 3) for b in batches)
    seen.append({im.tobytes() for b in batches for im in b['image']})
  assert not seen[0] & seen[1]


@pytest.mark.parametrize('processes', [1, 2, 3])
@pytest.mark.parametrize('crop', [0.875, None])
def test_folders_eval_is_exact(folder_root, processes, crop):
  c = _folder_config(folder_root, crop_fraction=crop)
  labels, counts = [], set()
  for p in range(processes):
    batches = list(input_pipeline.eval_iterator(c, 2 * processes, process_index=p,
                                                process_count=processes))
    counts.add(len(batches))
    for b in batches:
      assert b['image'].shape == (2, 32, 32, 3)
      labels += b['label'][b['mask'] == 1].tolist()
  assert len(counts) == 1
  assert sorted(labels) == sorted(i % 3 for i in range(7))


def test_missing_or_empty_data_is_one_line(tmp_path):
  for root in (str(tmp_path / 'nope'), str(tmp_path)):
    with pytest.raises(DataNotFoundError) as e:
      input_pipeline.get_info(_folder_config(root))
    assert '\n' not in str(e.value) and root in str(e.value)
  c = _data_config(name='tfrecords', data_dir=str(tmp_path), train_split='train-*',
                   eval_split='val-*', num_classes=5)
  with pytest.raises(DataNotFoundError, match='train-'):
    input_pipeline.get_info(c)


def _hash_split(relpath, percent=(80, 10, 10)):
  """The flat layout's documented rule, computed independently of folders.py."""
  b = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100
  ends = np.cumsum(percent)
  return ('train', 'val', 'test')[int(np.searchsorted(ends, b, side='right'))]


def _write_flat(root, photos, names):
  for (c, name), photo in zip(names, photos):
    os.makedirs(root / c, exist_ok=True)
    (root / c / name).write_bytes(_encode(photo, fmt='PNG' if name.endswith('.png') else 'JPEG'))


@pytest.fixture(scope='module')
def flat_root(tmp_path_factory):
  """DATA_DIR/<class>/<image>, no split folders, as GasHisSDB ships; one truncated image."""
  root = tmp_path_factory.mktemp('flat')
  names = [(c, f'{c}_{i:03d}.{"png" if i % 2 else "jpg"}')
           for c in ('abnormal', 'normal') for i in range(30)]
  _write_flat(root, _photos(len(names), seed=2), names)
  (root / 'normal' / 'zz_truncated.jpg').write_bytes(_encode(next(_photos(1)))[:300])
  (root / 'README.txt').write_text('not a class')
  return root, names


def _flat_splits(root, **kw):
  source = folders.Reader(_folder_config(str(root), **kw))
  return source, {s: {os.path.relpath(p, root): int(l) for p, l in zip(*source.files(s))}
                  for s in ('train', 'val', 'test')}


@pytest.mark.parametrize('percent', [None, (50, 30, 20)])
def test_flat_folders_split_by_path_hash(flat_root, percent):
  root, names = flat_root
  kw = {'split_percent': percent} if percent else {}
  source, splits = _flat_splits(root, **kw)
  assert source.classes == ['abnormal', 'normal']
  want = {s: {f'{c}/{n}': ['abnormal', 'normal'].index(c) for c, n in names
              if _hash_split(f'{c}/{n}', percent or (80, 10, 10)) == s}
          for s in ('train', 'val', 'test')}
  assert splits == want and all(want.values())  # Disjoint, covering, every split non-empty.
  skipped = _hash_split('normal/zz_truncated.jpg', percent or (80, 10, 10))
  assert source.skipped[skipped] == 1
  for s, files in want.items():
    np.testing.assert_array_equal(source.label_counts(s),
                                  np.bincount(list(files.values()), minlength=2))
  info = input_pipeline.get_info(_folder_config(str(root), **kw))
  assert info.class_names == ('abnormal', 'normal') and info.num_classes == 2
  assert (info.train_size, info.eval_size) == (len(want['train']), len(want['val']))
  labels = []
  for b in input_pipeline.eval_iterator(_folder_config(str(root), **kw), 4):
    labels += b['label'][b['mask'] == 1].tolist()
  assert sorted(labels) == sorted(want['val'].values())


def test_flat_folders_splits_are_stable_as_files_change(flat_root, tmp_path):
  root, names = flat_root
  _, before = _flat_splits(root)
  moved = tmp_path / 'moved'
  shutil.copytree(root, moved)
  os.remove(moved / 'abnormal' / names[0][1])
  _write_flat(moved, _photos(12, seed=3), [('normal', f'new_{i}.jpg') for i in range(12)])
  _, after = _flat_splits(moved)
  was = {f: s for s, files in before.items() for f in files}
  now = {f: s for s, files in after.items() for f in files}
  assert set(was) - set(now) == {f'abnormal/{names[0][1]}'}
  assert len(set(now) - set(was)) == 12
  assert all(now[f] == s for f, s in was.items() if f in now)


def test_flat_folders_unknown_split_is_one_line(flat_root):
  with pytest.raises(DataNotFoundError) as e:
    input_pipeline.get_info(_folder_config(str(flat_root[0]), eval_split='validation'))
  assert '\n' not in str(e.value) and "'validation'" in str(e.value)
  assert 'train, val, test' in str(e.value)


@pytest.fixture(scope='module')
def jft_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('jft')
  photos = list(_photos(26, seed=1))
  rng = np.random.default_rng(0)
  labels = []
  for name, idx in (('train-0', range(0, 7)), ('train-1', range(7, 14)),
                    ('train-2', range(14, 20)), ('val-0', range(20, 26))):
    with tf.io.TFRecordWriter(str(d / f'{name}.tfrecord')) as w:
      for i in idx:
        lab = sorted(rng.choice(10, size=rng.integers(1, 4), replace=False).tolist())
        labels.append((name[:3], lab))
        data = _encode(photos[i])
        if i == 3:
          data = data[:200]  # Corrupt: skipped.
        w.write(tfrecords.make_example(data, lab))
  return str(d), labels


def _jft_config(d, **kw):
  c = _data_config(
      name='tfrecords', data_dir=d, train_split='train-*.tfrecord', eval_split='val-*.tfrecord',
      num_classes=10, image_size=32, crop_fraction=0.875, shuffle_buffer=4,
      randaugment={'num_layers': 2, 'magnitude': 5})
  c.update(kw)
  return c


def test_jft_multi_hot_and_resume(jft_dir):
  d, labels = jft_dir
  c = _jft_config(d)
  info = input_pipeline.get_info(c)
  assert (info.num_classes, info.train_size, info.eval_size) == (10, 20, 6)
  # The one-time pass that counts records and lists the undecodable ones.
  tfrecords.write_counts(os.path.join(d, '*.tfrecord'))
  assert os.path.exists(os.path.join(d, tfrecords.COUNTS))
  with open(os.path.join(d, tfrecords.BAD)) as f:
    assert json.load(f) == {'train-0.tfrecord': [3]}
  info = input_pipeline.get_info(c)
  assert (info.train_size, info.eval_size, info.skipped_images) == (19, 6, 1)
  it = input_pipeline.train_iterator(c, 4, seed=1)
  first = [next(it) for _ in range(9)]  # 36 > 19 usable: crosses an epoch.
  b = first[0]
  assert b['label'].shape == (4, 10) and b['label'].dtype == np.float32
  assert set(np.unique(b['label'])) <= {0.0, 1.0} and (b['label'].sum(1) >= 1).all()
  resumed = input_pipeline.train_iterator(c, 4, seed=1, start_step=6)
  assert _digest([next(resumed) for _ in range(3)]) == _digest(first[6:])


def test_jft_resume_is_bit_exact_with_corrupt_records_and_no_sidecar(tmp_path):
  """Without bad_records.json, a corrupt record's position is filled by the next decodable
  example: later positions keep theirs, so a restart at any step repeats the uninterrupted run."""
  photos = list(_photos(12, seed=4))
  for f in range(2):
    with tf.io.TFRecordWriter(str(tmp_path / f'train-{f}.tfrecord')) as w:
      for i in range(6):
        data = _encode(photos[6 * f + i])
        if 6 * f + i in (2, 11):
          data = data[:200]  # Corrupt, and not listed anywhere.
        w.write(tfrecords.make_example(data, [6 * f + i]))
  c = _jft_config(str(tmp_path), multi_label=False)
  full = input_pipeline.train_iterator(c, 4, seed=2)
  uninterrupted = [next(full) for _ in range(9)]  # 36 positions: three epochs of 12.
  for k in (1, 4, 7):
    resumed = input_pipeline.train_iterator(c, 4, seed=2, start_step=k)
    assert _digest([next(resumed) for _ in range(9 - k)]) == _digest(uninterrupted[k:]), k
  labels = np.concatenate([b['label'] for b in uninterrupted]).reshape(3, 12)
  for epoch in labels:  # Every decodable record in every epoch; the corrupt ones never.
    assert set(epoch.tolist()) == set(range(12)) - {2, 11}


def test_jft_exact_eval_on_any_process_count(jft_dir):
  d, labels = jft_dir
  c = _jft_config(d)
  want = sorted(tuple(l) for s, l in labels if s == 'val')
  for processes in (1, 2, 4):
    got, counts = [], set()
    for p in range(processes):
      batches = list(input_pipeline.eval_iterator(c, processes, process_index=p,
                                                  process_count=processes))
      counts.add(len(batches))
      for x in batches:
        got += [tuple(np.flatnonzero(r).tolist()) for r in x['label'][x['mask'] == 1]]
    assert len(counts) == 1 and sorted(got) == want
  it = input_pipeline.train_iterator(c, 6, seed=0, process_index=1, process_count=3)
  assert next(it)['image'].shape == (2, 32, 32, 3)
def test_hostile_class_folders(folder_root, tmp_path):
  from coatnet_jax.data import image_limits  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  shutil.copytree(folder_root, root)
  photo = next(_photos(1, seed=5))
  # Hidden entries: a notebook checkpoint folder (with an image in it) and macOS resource forks.
  os.makedirs(root / 'train' / '.ipynb_checkpoints')
  (root / 'train' / '.ipynb_checkpoints' / 'a.JPEG').write_bytes(_encode(photo))
  (root / 'train' / 'class_0' / '._img_000.JPEG').write_bytes(b'\0\5\26\7 resource fork')
  # A 20000x20000 PNG header (a 'bomb') and a WebP image: the same rule as predict's.
  (root / 'train' / 'class_1' / 'bomb.png').write_bytes(hostile_files.png_header(20000, 20000))
  (root / 'train' / 'class_2' / 'photo.webp').write_bytes(_encode(photo, fmt='WEBP'))
  (root / 'train' / 'class_2' / 'notes.txt').write_text('not an image')
  c = _folder_config(str(root))
  info = input_pipeline.get_info(c)
  assert info.class_names == ('class_0', 'class_1', 'class_2')
  assert (info.train_size, info.skipped_images) == (25, 2)  # + the WebP; truncated and bomb.
  paths = list(folders.Reader(c).files('train')[0])
  assert any(p.endswith('photo.webp') for p in paths) and not any('bomb' in p for p in paths)
  assert '10000x8000' in image_limits.too_large(hostile_files.png_header(10000, 8000))
  assert '50,000,000' in image_limits.too_large(hostile_files.png_header(20000, 20000))
  assert image_limits.too_large(hostile_files.png_header(7071, 7071)) is None  # 49,999,041 pixels.
  assert image_limits.too_large(hostile_files.png_header(7072, 7071)) is not None
  # An empty class folder, one class only, a class whose only image does not decode: one line.
  os.makedirs(root / 'train' / 'class_3')
  with pytest.raises(ValueError, match='class_3 hold no image files') as e:
    input_pipeline.get_info(_folder_config(str(root)))
  one = tmp_path / 'one'
  shutil.copytree(root / 'train' / 'class_0', one / 'train' / 'only')
  shutil.copytree(root / 'val' / 'class_0', one / 'val' / 'only')
  with pytest.raises(ValueError, match='1 class folder \\(only\\)'):
    input_pipeline.get_info(_folder_config(str(one)))
  (root / 'train' / 'class_3' / 'broken.JPEG').write_bytes(b'not an image')
  shutil.copytree(root, tmp_path / 'broken')  # A new root: a listed split is cached per root.
  with pytest.raises(ValueError, match='class_3 have no decodable image'):
    input_pipeline.get_info(_folder_config(str(tmp_path / 'broken')))
  assert '\n' not in str(e.value)
