"""timm weight files in and out through the commands.

Bad files are refused in one line that names the file (and the tensor); a randomly initialised
timm model goes the whole way a user's download goes: ``import_timm``, a fine-tune on class
folders through ``configs/transfer.py:init=DIR,timm`` and ``main``, and ``export_timm`` back to a
file that timm loads with ``strict=True`` and that gives the fine-tuned model's logits (the
import and export functions run in process: the refused pickle runs the command itself).
"""

import os
import sys

import numpy as np
import pytest

from coatnet_jax import checkpointing
from coatnet_jax import convert
from coatnet_jax import pretrained
from coatnet_jax import steps
from coatnet_jax.tools import export_timm
from coatnet_jax.tools import import_timm
from run_module import run_module as _run

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

NAME = 'coatnet_pico_rw_224'  # timm's smallest CoAtNet: every switch of the rw family's convs.


def _assert_one_line(error, *names):
  message = str(error)
  assert '\n' not in message and 'Traceback' not in message, message
  for name in names:
    assert name in message, message


@pytest.fixture(scope='module')
def timm_state():
  torch.manual_seed(0)
  model = timm.create_model(NAME, pretrained=False, num_classes=11).eval()
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path):
  marker = tmp_path / 'it_ran'

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), 'w'))

  path = str(tmp_path / 'evil.pth')
  torch.save({'head.fc.weight': torch.zeros(2, 2), 'x': Payload()}, path)
  proc = _run(['coatnet_jax.tools.import_timm', '--model', NAME, '--weights', path, '--out',
               str(tmp_path / 'out')], check=False)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: ') and path in lines[0] and 'refused' in lines[0]
  assert 'weights_only' not in proc.stderr and not marker.exists()
  assert not os.path.exists(tmp_path / 'out')


def test_unreadable_files_name_the_file_in_one_line(tmp_path, monkeypatch):
  good = str(tmp_path / 'good.safetensors')
  safetensors_numpy.save_file({'a': np.ones((64, 64), np.float32)}, good)
  data = open(good, 'rb').read()
  for name, content in [('truncated_header.safetensors', data[:20]),
                        ('garbage.safetensors', b'\xff' * 8 + b'not a header'),
                        ('truncated_data.safetensors', data[:-100])]:
    path = str(tmp_path / name)
    with open(path, 'wb') as f:
      f.write(content)
    with pytest.raises(ValueError) as e:
      import_timm.load_state_dict(path)
    _assert_one_line(e.value, path, 'safetensors')

  pth = str(tmp_path / 'model.pth')
  torch.save({'a': torch.ones(2)}, pth)
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(ValueError) as e:
    import_timm.load_state_dict(pth)
  _assert_one_line(e.value, pth, 'needs torch')


def test_a_missing_or_misshapen_tensor_names_file_and_tensor(tmp_path, timm_state):
  _, state = timm_state
  for what, key, edit in [
      ('missing', 'stages.2.blocks.1.attn.qkv.weight', lambda s, k: s.pop(k)),
      ('misshapen', 'stages.0.blocks.0.conv2_kxk.weight',
       lambda s, k: s.__setitem__(k, s[k][:, :, :2])),
  ]:
    broken = dict(state)
    edit(broken, key)
    path = str(tmp_path / f'{what}.safetensors')
    safetensors_numpy.save_file(broken, path)
    with pytest.raises(ValueError) as e:
      import_timm.import_timm(NAME, path, str(tmp_path / what))
    _assert_one_line(e.value, path, key, what if what == 'missing' else 'shape')
    assert not os.path.exists(tmp_path / what)


def _write_folders(root, size=32, per_class=30):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for c, name in enumerate(('a', 'b')):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      image = np.clip(rng.normal(100 + 60 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(image).save(os.path.join(root, name, f'{i}.png'))


def test_import_fine_tune_on_folders_and_export_back_to_timm(tmp_path, timm_state):
  _, state = timm_state
  weights = str(tmp_path / 'download.safetensors')
  safetensors_numpy.save_file(state, weights)
  imported = str(tmp_path / 'imported')
  import_timm.import_timm(NAME, weights, imported)  # the command's function, in process
  assert checkpointing.latest_metadata(imported)['model'] == 'coatnet_pico_rw'

  data, workdir = str(tmp_path / 'folders'), str(tmp_path / 'run')
  _write_folders(data)
  _run(['coatnet_jax.main', '--config',
        f'configs/transfer.py:data_dir={data},init={imported},timm,res=32,batch=8',
        '--workdir', workdir, '--config.model.dtype=float32', '--config.total_steps=2',
        '--config.optim.warmup_epochs=0.0', '--config.eval_every_steps=2',
        '--config.checkpoint_every_steps=2', '--config.log_every_steps=1'])
  tuned = pretrained.read(workdir, use_ema=False)
  assert tuned.metadata['model'] == 'coatnet_pico_rw' and tuned.num_classes == 2
  assert tuned.config.model.switches.to_dict() == pretrained.read_metadata(imported)[0][
      'config']['model']['switches']

  exported = str(tmp_path / 'tuned.safetensors')
  info = export_timm.export_timm(workdir, NAME, exported, use_ema=False)
  assert (info['img_size'], info['num_classes']) == (32, 2)
  back = timm.create_model(NAME, pretrained=False, num_classes=2, img_size=32).eval()
  back.load_state_dict({k: torch.from_numpy(v)
                        for k, v in safetensors_numpy.load_file(exported).items()}, strict=True)
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(steps.build_model(tuned.config, 2).apply(tuned.variables, images,
                                                             train=False))
  with torch.no_grad():
    theirs = back(torch.from_numpy(convert.timm_input(images, NAME))).numpy()
  assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()
  # Not the imported weights: the fine-tune changed them (the head is new: 2 classes, not 11).
  assert not np.array_equal(back.state_dict()['stem.conv1.weight'].numpy(),
                            state['stem.conv1.weight'])

  with pytest.raises(ValueError, match="switches differ|'coatnet_nano_rw'"):
    export_timm.export_timm(workdir, 'coatnet_nano_rw_224', str(tmp_path / 'other.safetensors'))
