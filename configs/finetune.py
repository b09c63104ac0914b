r"""Fine-tuning at 384 or 512 on ImageNet-1K from a pre-trained checkpoint: paper Table 10.

30 epochs, batch 512 (from ImageNet-1K) or 1024 (from ImageNet-21K or JFT), AdamW at a constant 5e-5
with no warm-up, weight decay 1e-8, clipping 1.0, EMA 0.9999, softmax with label smoothing 0.1,
RandAugment and stochastic depth as in pre-training (JFT sources: depth 0.1 / 0.3 / 0.2 for
CoAtNet-3 / 4 / 5; CoAtNet-3 from 1K: RandAugment (2, 20)), Mixup 0.8 from 1K only. Eval resizes the
whole image without a centre crop. ``init`` is read once, at the start: every relative-bias table is
resized to ``res`` (bilinear) and a new zero-initialised head replaces the old one when the class
count changes (21,841 -> 1,000). A stopped fine-tune resumes from its own workdir, never from init.

  python -m coatnet_jax.main --config configs/finetune.py:init=PRETRAIN_DIR,res=384,source=in21k,variant=coatnet_2 \
      --config.data.data_dir=DATA_DIR --workdir FINETUNE_DIR

Arguments:
  init=DIR      workdir of the pre-training run (its newest checkpoint; --config.init.step=N for
                another), or the --out of ``python -m coatnet_jax.tools.import_timm``
  res=384|512   fine-tuning resolution (any size works; the paper uses these two)
  source=in1k|in21k|jft   what init was pre-trained on: picks batch, Mixup, depth, RandAugment
  variant=coatnet_N       must be the variant of init
  timm          init was imported from timm: build the model and switches saved there (any
                timm CoAtNet; variant then only picks the recipe row)
  data=digits   the quickstart's digits instead of ImageNet (coatnet_pico, a CPU-sized check)

Should reach (paper Tables 4-5, top-1 on ImageNet-1K val): from 1K at 384: CoAtNet-0 83.9, -1 85.1,
-2 85.7, -3 85.8; from 21K at 384: CoAtNet-2 87.1, -3 87.6, -4 87.9 (88.1 at 512). Not yet
reproduced with this code.
"""

from configs import common

# source -> (global batch, Mixup alpha, stochastic depth per variant, RandAugment (N, M) per variant)
RECIPE = {
    'in1k': (512, 0.8, {'coatnet_0': 0.2, 'coatnet_1': 0.3, 'coatnet_2': 0.5, 'coatnet_3': 0.7},
             {'coatnet_0': (2, 15), 'coatnet_1': (2, 15), 'coatnet_2': (2, 15),
              'coatnet_3': (2, 20)}),
    'in21k': (1024, 0.0, {'coatnet_2': 0.3, 'coatnet_3': 0.5, 'coatnet_4': 0.7}, {}),
    'jft': (1024, 0.0, {'coatnet_3': 0.1, 'coatnet_4': 0.3, 'coatnet_5': 0.2},
            {'coatnet_3': (2, 5), 'coatnet_4': (2, 5), 'coatnet_5': (2, 5)}),
}


def get_config(arg=None):
  args = common.parse_arg(arg, init='', res=384, source='in1k', variant='coatnet_0', timm=False,
                          data='imagenet2012')
  if args.source not in RECIPE:
    raise ValueError(f'source={args.source!r}; valid: {sorted(RECIPE)}.')
  batch, mixup, depth, randaugment = RECIPE[args.source]
  digits = args.data == 'digits'
  if args.data not in ('imagenet2012', 'digits'):
    raise ValueError(f'data={args.data!r}; valid: imagenet2012, digits (configs/transfer.py '
                     f'fine-tunes on your own folders).')
  if not digits and args.variant not in depth:
    raise ValueError(f'finetune from {args.source} has recipes for {sorted(depth)}; got '
                     f'{args.variant!r}.')
  c = common.get_base_config()
  c.init.path = args.init or None
  c.model.name = args.variant
  c.model.drop_path_rate = depth.get(args.variant, 0.0)
  if args.timm:  # The architecture saved by import_timm in init, whichever timm model it was.
    from coatnet_jax import pretrained  # pylint: disable=g-import-not-at-top
    c.model.name, switches = pretrained.timm_architecture(args.init, args.variant)
    c.model.switches.update(switches)
  c.data.name = 'imagenet2012'
  c.data.image_size = args.res
  c.data.crop_fraction = None  # Whole-image resize, no centre crop.
  c.data.randaugment.num_layers, c.data.randaugment.magnitude = randaugment.get(args.variant,
                                                                               (0, 0))
  c.batch_size = batch
  c.eval_batch_size = 1024
  c.num_epochs = 30.0
  c.optim.lr, c.optim.min_lr = 5e-5, 5e-5
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 1e-8
  c.optim.clip_norm = 1.0
  c.ema.decay = 0.9999
  c.loss.kind = 'softmax'
  c.loss.label_smoothing = 0.1
  c.loss.mixup_alpha = mixup
  if digits:  # The quickstart's data and model, at the recipe's schedule.
    c.model.name = 'coatnet_pico'
    c.model.dtype = 'float32'
    c.model.switches.bn_momentum = 0.9
    c.data.name = 'digits'
    c.data.train_split, c.data.eval_split = 'train', 'test'
    c.data.max_shift = 2 * args.res // 32
    c.data.randaugment.num_layers = 0
    c.batch_size, c.eval_batch_size = 64, 120
    c.loss.mixup_alpha = 0.0
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.log_every_steps = 50
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 200
  return c
