r"""Transfer to your own small dataset of class folders (for example GasHisSDB), any input size.

  python -m coatnet_jax.main --config configs/transfer.py:data_dir=DIR,variant=coatnet_1,init=PRE,res=160 \
      --workdir WORKDIR

Layouts (coatnet_jax/data/folders.py): DIR/<split>/<class>/<image> with your own train/val/test
folders, or DIR/<class>/<image>, which is split 80/10/10 into 'train'/'val'/'test' by a hash of
each file's path (stable when files are added; ``--config.data.split_percent='(70,15,15)'``).
Class names are the folder names; they go into the checkpoint metadata, the exported model and
``predict``'s output. Every eval reports accuracy, precision, recall, F1 (binary, class 1 =
the second folder in sorted order, for two classes; macro for more), ROC AUC for two classes and
the confusion matrix, in the log, metrics.jsonl and TensorBoard.

Arguments:
  data_dir=DIR        the folders
  variant=coatnet_N   model (coatnet_pico for a CPU-sized check)
  init=DIR            start from this pre-trained run or import (tables resized, new zero head);
                      without it the model trains from scratch
  res=N               input size; any size works (120 and 80 too: the model pads odd sizes
                      when it down-samples), images are resized to it whole, without a crop
  timm                init was imported from timm: build the model and switches saved there
                      (any timm CoAtNet, e.g. coatnet_rmlp_2_rw_224; variant is then ignored)
  balanced            class-balanced loss weights n / (classes * count) for imbalanced folders
  eval=val            the split evaluated during training ('test' for the final number)
  tiles               tiles with no up (histology, textures): also up-down flips and rotations
                      by k x 90 degrees
  epochs=N, batch=N   schedule (default 10 epochs from init, 30 from scratch, batch 32; at
                      least 300 steps whatever the dataset size, see below)

Recipe: AdamW, cosine from 1e-4 (from init) or 1e-3 (from scratch) after a one-epoch warm-up,
weight decay 1e-8 / 0.05, clipping 1.0, label smoothing 0.1, Inception crop of 25-100% of the
area (not 8-100%: tiles keep their scale cue) and flip, no RandAugment or Mixup (both available:
data.randaugment, loss.mixup_alpha / cutmix_alpha). Run length from the dataset size: the epochs
above, but at least 300 steps (``min_steps``), since a 120-image set gives 3 steps an epoch.
BatchNorm statistics are recomputed over 10 train batches (eval view) before every eval and save
(``batchnorm_batches``), so they are right at any run length and momentum.
Published reference on GasHisSDB (CoAtNet-1, 160 px): 98.74% accuracy,
99.38 F1, 99.97 precision; not reproduced with this code.

Measured (coatnet_pico from scratch, float32, 2 CPU cores, split 60/10/30 by the hash rule,
test accuracy; the sets that ``python -m coatnet_jax.tools.sample_sets`` writes from package
files, README "Small real datasets"): faces (2 classes, 124 train / 60 test, res 32) 0.983 against
0.967 for logistic regression on pixels (``tools.baseline``) and 0.850 with the running averages
instead of recomputed statistics; textures (3 classes of 64 px tiles, 111 / 59, res 64) 1.000
against 0.729 and 0.542; photos (2 classes of 64 px colour tiles, 72 / 42) 0.976 against 0.714.
Crop area 25-100% against the usual 8-100% on textures: 1.000 against 0.949; ``tiles`` there: 1.000.
One run per setting; the settings were fixed before these runs, not searched on the test images.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, data_dir='', variant='coatnet_0', init='', res=224, timm=False,
                          balanced=False, eval='val', epochs=0.0, batch=32, tiles=False)
  c = common.get_base_config()
  c.model.name = args.variant
  c.model.drop_path_rate = 0.1
  if args.timm:  # The architecture saved by import_timm in init, whichever timm model it was.
    from coatnet_jax import pretrained  # pylint: disable=g-import-not-at-top
    c.model.name, switches = pretrained.timm_architecture(args.init, args.variant)
    c.model.switches.update(switches)
  c.init.path = args.init or None
  c.data.name = 'folders'
  c.data.data_dir = args.data_dir or None
  c.data.train_split, c.data.eval_split = 'train', args.eval
  c.data.image_size = args.res
  c.data.crop_fraction = None  # Whole-image resize: tiles are already the region of interest.
  c.data.shuffle_buffer = 10_000
  c.data.split_percent = (80, 10, 10)  # train/val/test of the DIR/<class>/<image> layout.
  c.data.crop_area = (0.25, 1.0)
  c.data.vflip = c.data.rot90 = args.tiles
  c.classification_metrics = True
  c.batch_size = args.batch
  c.eval_batch_size = 4 * args.batch
  c.num_epochs = args.epochs or (10.0 if args.init else 30.0)
  c.min_steps = 300
  c.batchnorm_batches = 10
  c.optim.lr, c.optim.min_lr = (1e-4, 1e-6) if args.init else (1e-3, 1e-5)
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = 0
  c.optim.warmup_epochs = 1.0
  c.optim.weight_decay = 1e-8 if args.init else 0.05
  c.optim.clip_norm = 1.0
  c.loss.kind = 'softmax'
  c.loss.label_smoothing = 0.1
  c.loss.class_weights = 'balanced' if args.balanced else ''
  c.mesh.data, c.mesh.fsdp = -1, 1  # Small models: data parallel.
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
