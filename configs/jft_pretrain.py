r"""JFT-style multi-label pre-training at 224: the paper's Table 10 recipe for CoAtNet-3..5.

14 epochs, batch 4096, AdamW peak 1e-3 (CoAtNet-3) / 5e-4 (-4, -5) -> 1e-5 with linear decay after
20K warm-up steps, weight decay 0.01, sigmoid loss, label smoothing 1e-4, RandAugment (2, 5),
stochastic depth 0.0 / 0.1 / 0.0, clipping 1.0. JFT is not public: bring your own corpus as
sharded TFRecords of the schema in coatnet_jax/data/tfrecords.py (encoded image bytes and a list
of integer labels), read by glob, labels multi-hot (JFT-300M has 18,291 classes).

  python -m coatnet_jax.data.tfrecords --write_counts 'DIR/train-*.tfrecord'   # once
  python -m coatnet_jax.main --config configs/jft_pretrain.py:variant=coatnet_3 \
      --config.data.data_dir=DIR --config.data.num_classes=18291 --workdir WORKDIR

Should reach: the paper reports no pre-training metric; its ImageNet-1K fine-tuning results after
JFT pre-training are in its Table 5 (e.g. CoAtNet-7, JFT-3B, 512: 90.88). Not reproduced here.
"""

from configs import common

RECIPE = {  # variant: (peak lr, stochastic depth)
    'coatnet_3': (1e-3, 0.0), 'coatnet_4': (5e-4, 0.1), 'coatnet_5': (5e-4, 0.0)}


def get_config(arg=None):
  args = common.parse_arg(arg, variant='coatnet_3', runlocal=False)
  if args.variant not in RECIPE:
    raise ValueError(f'variant={args.variant}: jft_pretrain has recipes for {", ".join(RECIPE)}.')
  c = common.get_base_config()
  c.model.name = args.variant
  c.optim.lr, c.model.drop_path_rate = RECIPE[args.variant]
  c.data.name = 'tfrecords'
  c.data.train_split = 'train-*.tfrecord'
  c.data.eval_split = 'val-*.tfrecord'
  c.data.num_classes = c.get_ref('num_classes')  # Set either; the trainer and data share it.
  c.data.image_size = 224
  c.data.randaugment.num_layers, c.data.randaugment.magnitude = 2, 5
  c.batch_size = 4096
  c.num_epochs = 14.0
  c.optim.min_lr = 1e-5
  c.optim.schedule = 'linear'
  c.optim.warmup_steps = 20_000
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0
  c.loss.kind = 'sigmoid'
  c.loss.label_smoothing = 1e-4
  c.eval_every_steps = 10_000
  if args.runlocal:
    common.runlocal(c)
  return c
