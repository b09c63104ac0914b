r"""ImageNet-1K from scratch at 224: the paper's Table 10 recipe for CoAtNet-0..3.

300 epochs, batch 4096, AdamW peak 1e-3 -> 1e-5 cosine after 10K warm-up steps, weight decay 0.05,
label smoothing 0.1, RandAugment (2, 15), Mixup 0.8, stochastic depth 0.2 / 0.3 / 0.5 / 0.7,
gradient clipping 1.0, bf16 compute, TFDS ``imagenet2012`` (prepared under
``--config.data.data_dir``: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
DATA_DIR/downloads/manual, then ``python -m coatnet_jax.data.prepare imagenet2012 --data_dir
DATA_DIR``). Eval: resize and centre crop 0.875.

  python -m coatnet_jax.main --config configs/in1k.py:variant=coatnet_0 --workdir gs://BUCKET/c0

Should reach (paper Table 4, 224, top-1 on val): CoAtNet-0 81.6, -1 83.3, -2 84.1, -3 84.5.
Not yet reproduced with this code.

Variants override fields, they do not copy this file:
  :variant=coatnet_1            another model (drop path follows the table)
  :runlocal                     a few steps of coatnet_pico at 64 px, to check a setup
  --config.mesh.fsdp=8 --config.mesh.data=-1   shard parameters over groups of 8 devices
  --config.accum_steps=4        same global batch on fewer devices
"""

from configs import common

DROP_PATH = {'coatnet_0': 0.2, 'coatnet_1': 0.3, 'coatnet_2': 0.5, 'coatnet_3': 0.7}


def get_config(arg=None):
  args = common.parse_arg(arg, variant='coatnet_0', runlocal=False)
  if args.variant not in DROP_PATH:
    raise ValueError(f'variant={args.variant}: in1k has recipes for {", ".join(DROP_PATH)}.')
  c = common.get_base_config()
  c.model.name = args.variant
  c.model.drop_path_rate = DROP_PATH[args.variant]
  c.data.name = 'imagenet2012'
  c.data.image_size = 224
  c.data.randaugment.num_layers, c.data.randaugment.magnitude = 2, 15
  c.batch_size = 4096
  c.num_epochs = 300.0
  c.optim.lr, c.optim.min_lr = 1e-3, 1e-5
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = 10_000
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.loss.kind = 'softmax'
  c.loss.label_smoothing = 0.1
  c.loss.mixup_alpha = 0.8
  if args.runlocal:
    common.runlocal(c)
  return c
