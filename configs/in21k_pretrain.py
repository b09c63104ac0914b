r"""ImageNet-21K pre-training at 224: the paper's Table 10 recipe for CoAtNet-2..4.

90 epochs, batch 4096, AdamW peak 1e-3 -> 1e-5 with linear decay after a 5-epoch warm-up, weight
decay 0.01, sigmoid loss, label smoothing 1e-4, no Mixup, no RandAugment (``:ra`` asks for (2, 5),
the CoAtNet-4 "PT-RA" setting), stochastic depth 0.3 / 0.5 / 0.7, clipping 1.0. Classes: as the
dataset says (21,841 for the fall11 release); ``--config.num_classes`` overrides.
The TFDS dataset ``imagenet21k`` (fall11 or winter21) is built by this project from the release:
  python -m coatnet_jax.data.imagenet21k --manual_dir RELEASE_DIR --data_dir DATA_DIR
Its ``validation`` split holds ~0.8% of the images by a fixed hash of the file name (21K has no
validation set; rule in coatnet_jax/data/imagenet21k.py); the classes are those found (21,841 for
fall11, 19,167 for winter21).

  python -m coatnet_jax.main --config configs/in21k_pretrain.py:variant=coatnet_2 --workdir DIR

Should reach: the paper reports no pre-training metric; fine-tuned on 1K at 384 these checkpoints
give top-1 87.1 (CoAtNet-2), 87.6 (-3), 87.9 (-4) (fine-tuning is a later issue).
"""

from configs import common

DROP_PATH = {'coatnet_2': 0.3, 'coatnet_3': 0.5, 'coatnet_4': 0.7}


def get_config(arg=None):
  args = common.parse_arg(arg, variant='coatnet_2', ra=False, runlocal=False)
  if args.variant not in DROP_PATH:
    raise ValueError(f'variant={args.variant}: in21k_pretrain has recipes for '
                     f'{", ".join(DROP_PATH)}.')
  c = common.get_base_config()
  c.model.name = args.variant
  c.model.drop_path_rate = DROP_PATH[args.variant]
  c.data.name = 'imagenet21k'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  if args.ra:
    c.data.randaugment.num_layers, c.data.randaugment.magnitude = 2, 5
  c.batch_size = 4096
  c.num_epochs = 90.0
  c.optim.lr, c.optim.min_lr = 1e-3, 1e-5
  c.optim.schedule = 'linear'
  c.optim.warmup_steps = 0
  c.optim.warmup_epochs = 5.0
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0
  c.loss.kind = 'sigmoid'
  c.loss.label_smoothing = 1e-4
  c.eval_every_steps = 10_000
  if args.runlocal:
    common.runlocal(c)
  return c
