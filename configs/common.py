"""Defaults every config starts from, and the ``:ARGS`` parser; the recipes override fields.

Every number a run can change is here or in the recipe files, never in the trainer.
"""

import dataclasses
import typing

import ml_collections

from coatnet_jax import models


def parse_arg(arg, **defaults):
  """'variant=coatnet_1,runlocal' -> ConfigDict(variant='coatnet_1', runlocal=True, ...)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key}; valid: {", ".join(sorted(defaults))}.')
    kind = type(defaults[key])
    try:
      out[key] = (value or True) if kind is bool and not value else kind(value)
    except ValueError:
      raise ValueError(f'config argument {key}={value} is not a valid {kind.__name__}.') from None
  return out


def model_switches(options_class):
  """Every field of ``options_class`` (``models.Options``) with its default, declared there once,
  so that each can be set with ``--config.model.switches.NAME=VALUE`` (a field added to Options
  appears here too)."""
  hints = typing.get_type_hints(options_class)
  switches = ml_collections.ConfigDict()
  for field in dataclasses.fields(options_class):
    default = getattr(options_class(), field.name)
    if default is None:  # Optional[X]: a typed reference, so that an override parses as X.
      kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), str)
      default = ml_collections.FieldReference(None, field_type=kind)
    switches[field.name] = default
  return switches


def get_base_config():
  """The fields the trainer reads, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = ml_collections.FieldReference(None, field_type=int)  # None: the dataset's.

  c.model = ml_collections.ConfigDict()
  c.model.name = 'coatnet_0'  # A layout of models.VARIANTS, or one of extra_variants.
  # Layouts the table lacks, by name, as models.Variant fields (coatnet_jax/architecture.py), e.g.
  # {'my_size': dict(stem_width=32, head_size=32, stages=((('C', 32, 1),), (('C', 64, 1),),
  #                                                       (('T', 128, 2),), (('T', 256, 1),)))}.
  c.model.extra_variants = ml_collections.ConfigDict()
  c.model.dtype = 'bfloat16'  # Compute dtype; parameters are float32.
  c.model.drop_path_rate = 0.0
  c.model.switches = model_switches(models.Options)  # Every Options field, its default there.
  # Rematerialisation per block in the backward pass: 'none', 'block' (recompute each block from
  # its input) or 'dots' (keep matmul outputs only); less memory for more compute (README).
  c.model.remat = 'none'

  c.data = ml_collections.ConfigDict()
  # 'digits' (sklearn's, in memory, no TF), 'tfrecords' (JFT-style multi-label TFRecords by glob),
  # 'folders' (DATA_DIR/<split>/<class>/<image>), or a TFDS name ('imagenet2012', 'imagenet21k').
  c.data.name = 'imagenet2012'
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.train_split = 'train'  # A TFDS split, a sub-folder ('folders') or a glob ('tfrecords').
  c.data.eval_split = 'validation'
  c.data.num_classes = ml_collections.FieldReference(None, field_type=int)  # None: the dataset's.
  c.data.image_size = 224
  # Eval: resize, then centre crop of this fraction (pre-training); None: whole-image resize, no
  # crop (fine-tuning, paper Table 10).
  c.data.crop_fraction = ml_collections.FieldReference(0.875, field_type=float)
  c.data.train_resize_method = 'bilinear'  # Random-crop resize (no antialias; big_vision's).
  c.data.eval_resize_method = 'bicubic'  # Eval resize, antialiased.
  c.data.shuffle_buffer = 50_000  # Examples; the TFRecord sources' per-epoch seeded shuffle.
  c.data.max_shift = 0  # Digits only: random translation in pixels.
  c.data.multi_label = True  # TFRecords only: multi-hot float32 labels; False: the first, int32.
  # Class folders without split folders only: train/val/test percentages of the path-hash split.
  c.data.split_percent = (80, 10, 10)
  # Train view of the TF sources (data/streams.py): Inception crop of an area fraction and aspect
  # ratio drawn from these ranges (tiles keep their scale cue with a narrow area range), random
  # left-right flip, up-down flip and rotation by k x 90 degrees (for images with no up).
  c.data.crop_area = (0.08, 1.0)
  c.data.crop_aspect = (3 / 4, 4 / 3)
  c.data.hflip = True
  c.data.vflip = False
  c.data.rot90 = False
  # RandAugment(N, M), TF EfficientNet magnitudes, M not clipped at 10 (data/randaugment.py).
  c.data.randaugment = ml_collections.ConfigDict({'num_layers': 0, 'magnitude': 0})

  c.batch_size = 4096  # Global, over all devices and processes.
  c.accum_steps = 1  # Micro-batches per step (gradient accumulation).
  c.eval_batch_size = 1024
  c.num_epochs = 300.0
  c.total_steps = 0  # > 0 overrides num_epochs.
  c.min_steps = 0  # The schedule from num_epochs runs at least this many steps (small datasets).
  # > 0: before each eval and save, BatchNorm mean/variance are recomputed over this many train
  # batches (eval view) instead of the running averages (coatnet_jax/batchnorm_stats.py).
  c.batchnorm_batches = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-5
  c.optim.schedule = 'cosine'  # cosine | linear | constant (after the warm-up).
  c.optim.warmup_steps = 10_000
  c.optim.warmup_epochs = 0.0  # > 0 overrides warmup_steps.
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # AdamW's epsilon (optax's default).
  # Regexes on parameter paths that take no weight decay: norms, biases, relative-bias tables
  # (paper's code; 'Traps' in the reference notes). The last two: timm's relative-position MLP
  # and layer scales (timm decays neither).
  c.optim.no_decay = (r'(^|/)[^/]*_norm/(scale|bias)$', r'(^|/)bias$', r'(^|/)relative_bias$',
                      r'(^|/)rel_pos_mlp/', r'(^|/)(attn|ffn)_scale$')

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'softmax'  # softmax | sigmoid
  c.loss.label_smoothing = 0.1
  c.loss.mixup_alpha = 0.0
  c.loss.cutmix_alpha = 0.0
  c.loss.switch_prob = 0.5
  # 'balanced': weight each example's loss by n / (classes * count of its class) in the train
  # split (scikit-learn's 'balanced'), for imbalanced class folders; '' : unweighted.
  c.loss.class_weights = ''

  c.ema = ml_collections.ConfigDict({'decay': 0.0, 'warmup': True})  # decay 0: no EMA.

  c.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1})  # -1: all remaining devices.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.min_size = 2**18  # Smaller arrays are replicated.
  c.sharding.rules = ()  # ((regex, spec), ...), e.g. (('relative_bias', ()),) to replicate.

  # Start from another run's model (fine-tuning; coatnet_jax/pretrained.py): its workdir, a step of
  # it (0: the newest), and whether to take its EMA weights when it has them. A run that has
  # checkpoints of its own resumes from them and never reads init again.
  c.init = ml_collections.ConfigDict()
  c.init.path = ml_collections.FieldReference(None, field_type=str)
  c.init.step = 0
  c.init.use_ema = True

  # Accuracy, precision, recall, F1 (binary for 2 classes, else macro), ROC AUC (2 classes) and the
  # confusion matrix at every eval, for few-class tasks: the C x C matrix is summed on the device.
  c.classification_metrics = False

  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3  # The latest N, plus the best by best_metric.
  c.best_metric = ml_collections.FieldReference(None, field_type=str)  # None: top1 or prec@1.
  c.best_mode = 'max'
  c.async_checkpointing = True
  # A save that neither finishes nor fails in this time stops the run as failed (Orbax can hang
  # when a background write fails, seen with a full disk); raise it for very slow storage.
  c.checkpoint_timeout_s = 600.0
  # Load a checkpoint of another architecture: only leaves whose path and shape match.
  c.allow_partial_load = False
  # Resume although fields that change what the run computes (batch, seed, optimizer, schedule,
  # loss, data stream) differ from the saved run; every change is appended to
  # WORKDIR/config_history.jsonl (coatnet_jax/config_checks.py lists what may always change).
  c.allow_resume_changes = False
  c.profile_steps = 0  # > 0: trace this many steps after warm-up into workdir/profile.
  c.tensorboard = True
  c.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)  # None: ~/.cache.
  return c


def runlocal(c):
  """Shrinks a recipe to a few CPU-sized steps that still read the real dataset."""
  c.model.name = 'coatnet_pico'
  c.model.dtype = 'float32'
  c.data.image_size = 64
  c.data.shuffle_buffer = 1000
  if c.data.name not in ('tfrecords', 'folders'):  # TFDS split slicing; globs stay as they are.
    c.data.eval_split = c.data.eval_split.split('[')[0] + '[:256]'
  c.batch_size = 16
  c.eval_batch_size = 64
  c.total_steps = 20
  c.optim.warmup_steps = 5
  c.optim.warmup_epochs = 0.0
  c.log_every_steps = 5
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 0
  c.mesh.data, c.mesh.fsdp = -1, 1


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by a run (JSON, as in its checkpoint's metadata) over today's base config: a
  run saved before a field existed still builds, evaluates and exports, with that field's default.
  The one place a saved config is read back."""

  def over(base, values):
    out = dict(base)
    for key, value in values.items():
      out[key] = over(base[key], value) if isinstance(base.get(key), dict) and isinstance(
          value, dict) else value
    return out

  return ml_collections.ConfigDict(over(get_base_config().to_dict(), saved))
