"""What every command line shares: quiet start-up, --help that exits 0, the one error path
(``errors.exit_on_user_error``) around flag parsing and ``main``, and the ``--config`` flag (any
working directory, ``None`` overrides, one-line ``UserError``s for bad fields).

Imported by each entry point before anything loads TensorFlow or probes JAX backends.
"""

import contextlib
import logging as std_logging
import os
import re
import sys

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features) say nothing a user can act on.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from coatnet_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull')


class _QuietLibraries(std_logging.Filter):
  """Drops library noise: Orbax's INFO lines (every save and restore in detail, and its missing-
  metadata warning for checkpoints written without it), JAX's backend probing, TFDS's INFO lines
  (the files behind every tf.data pipeline)."""

  def filter(self, record):
    msg = str(record.msg)
    if record.name == 'asyncio' and 'never retrieved' in msg:
      return False  # Orbax's internal futures of a failed save; the error itself is raised once.
    if 'Unable to initialize backend' in msg:  # JAX probing for TPUs and GPUs that are absent.
      return False
    if '/tensorflow_datasets/' in record.pathname:  # Which files each tf.data pipeline reads.
      return record.levelno >= std_logging.WARNING
    if '/orbax/' in record.pathname:
      return record.levelno >= std_logging.ERROR or (
          record.levelno >= std_logging.WARNING and 'metadata' not in msg.lower())
    return True


def quiet_logs():
  """Installs the filter on absl's handler and on the loggers that bypass it."""
  quiet = _QuietLibraries()
  logging.get_absl_handler().addFilter(quiet)
  for name in ('jax._src.xla_bridge', 'absl'):
    std_logging.getLogger(name).addFilter(quiet)


@contextlib.contextmanager
def silent_stderr():
  """Points file descriptor 2 at /dev/null for the duration (TensorFlow's C++ start-up lines come
  before any setting of its logger can act); Python exceptions still propagate and print after."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def import_tensorflow():
  """``import tensorflow`` without its C++ start-up banners (oneDNN, CPU features)."""
  if 'tensorflow' not in sys.modules:
    with silent_stderr():
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _help_requested(argv) -> bool:
  return any(a in HELP or a.split('=')[0] in HELP for a in argv[1:])


def run(main, flags_parser=None, user_errors=()):
  """``app.run`` with quiet logs, ``--help`` that prints the flags and exits 0, and a
  ``UserError`` from the flags or ``main`` (or one of ``user_errors``, the library exceptions the
  command counts as bad input) printed as ``error:`` lines with exit status 1."""
  def parse(argv):
    if _help_requested(argv):
      for name in list(flags.FLAGS):  # Required flags must not stop the help text.
        flags.FLAGS[name].validators = []
      flags.FLAGS.unparse_flags()
      app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True, exitcode=0)
    with errors.exit_on_user_error():
      return (flags_parser or _parse_plain)(argv)

  def wrapped(argv):
    quiet_logs()
    with errors.exit_on_user_error(*user_errors):
      return main(argv)

  app.run(wrapped, flags_parser=parse)


def flag_error(e: Exception) -> str:
  """absl's flag error as a short reason ('--workdir is required', '--top=x: ...')."""
  text = errors.one_line(e)
  m = re.search(r'Flag (--\S+) must have a value other than None', text)
  if m:
    return f'{m.group(1)} is required; see --help.'
  return re.sub(r'^flag ', '', text)


def _parse_plain(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise errors.UserError(flag_error(e)) from None


# ---------------------------------------------------------------------------------------------
# --config FILE[:ARGS] and --config.a.b=VALUE


def config_path(value: str) -> str:
  """The config file as given, or (for a relative path that is not there) the repository's."""
  path, sep, args = value.partition(':')
  if not os.path.exists(path) and not os.path.isabs(path):
    for candidate in (os.path.join(REPO, path), os.path.join(REPO, 'configs', path)):
      if os.path.exists(candidate):
        return candidate + sep + args
  if not os.path.exists(path):
    raise errors.UserError(f'no config file {path} (from {os.getcwd()}, nor in {REPO}); give a '
                           f'configs/*.py file.')
  return value


def _config_arg(argv, name):
  """(index, value, inline) of ``--name VALUE`` / ``--name=VALUE`` in argv, else None."""
  for i, a in enumerate(argv):
    if a == f'--{name}' and i + 1 < len(argv):
      return i, argv[i + 1], False
    if a.startswith(f'--{name}='):
      return i, a.split('=', 1)[1], True
  return None


def _none_overrides(argv, name):
  """Removes ``--name.PATH=None`` from argv; returns (argv, [PATH, ...])."""
  keep, paths = [], []
  for a in argv:
    m = re.fullmatch(rf'--{re.escape(name)}\.([\w.]+)=(None|none|null)', a)
    if m:
      paths.append(m.group(1))
    else:
      keep.append(a)
  return keep, paths


def _field(config, path):
  """(parent ConfigDict, key) of a dotted path; raises KeyError naming the first missing part."""
  parts = path.split('.')
  node = config
  for i, part in enumerate(parts[:-1]):
    if part not in node:
      raise KeyError('.'.join(parts[:i + 1]))
    node = node[part]
  if parts[-1] not in node:
    raise KeyError(path)
  return node, parts[-1]


def _unknown_field(config, path: str) -> str:
  """'unknown config field a.bb; did you mean a.b?' (or the valid fields where none is close)."""
  import difflib  # pylint: disable=g-import-not-at-top
  parts, node = path.split('.'), config
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys'):
      break
    if part not in node:
      keys = sorted(str(k) for k in node.keys())
      prefix = '.'.join(parts[:i])
      close = difflib.get_close_matches(part, keys, 1, 0.6)
      bad = '.'.join(parts[:i + 1])
      if close:
        return f'unknown config field {bad}; did you mean {".".join(parts[:i] + close)}?'
      return (f'unknown config field {bad}; the fields{" of " + prefix if prefix else ""} are '
              f'{", ".join(keys)}.')
    node = node[part]
  return f'unknown config field {path}.'


def _load_config(value):
  """The config a --config value names, loaded as config_flags loads it (for error messages)."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  return config_flags.ConfigFileFlagParser('config', lock_config=False).parse(value)


def _config_file_error(text: str) -> str:
  """The reason from config_flags' 'Error whilst parsing config file' (a whole traceback)."""
  if 'Traceback' not in text:
    return text
  last = [line for line in text.strip().splitlines() if line.strip()][-1]
  return re.sub(r'^\w+(Error|Exception): ', '', last.strip())


def parse_config_flags(argv, name='config'):
  """absl's parser for a command with ``--config``: every mistake is one ``error:`` line."""
  found = found_given = _config_arg(argv, name)
  if found and not _help_requested(argv):
    i, value, inline = found
    value = config_path(value)
    found = (i, value, inline)
    argv = list(argv)
    if inline:
      argv[i] = f'--{name}={value}'
    else:
      argv[i + 1] = value
  argv, nones = _none_overrides(argv, name)
  try:
    rest = flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    text = str(e)
    m = re.match(r'flag --(\S+?)=(.*?): Error whilst parsing config file:(.*)', text, re.S)
    if m:
      given = found_given[1].partition(':')[0] if found_given else m.group(2)
      raise errors.UserError(f'{given}: {_config_file_error(m.group(3))}') from None
    raise errors.UserError(flag_error(e)) from None
  except flags.Error as e:
    raise errors.UserError(flag_error(e)) from None
  except (AttributeError, KeyError) as e:  # An override of a field that is absent.
    detail = e.args[0] if e.args else ''
    detail = detail.args[0] if isinstance(detail, BaseException) and detail.args else detail
    field = re.match(r"\W*([\w.]+)", str(detail))
    field = field.group(1) if field else str(detail)
    paths = [a.split('=')[0][len(name) + 3:] for a in argv
             if a.startswith(f'--{name}.') and re.search(rf'(^|\.){re.escape(field)}$',
                                                        a.split('=')[0][len(name) + 3:])]
    try:
      problem = _unknown_field(_load_config(found[1] if found else ''),
                               paths[0] if paths else field)
    except Exception:  # pylint: disable=broad-except
      problem = f'unknown config field {paths[0] if paths else field}.'
    raise errors.UserError(problem) from None
  except Exception as e:  # pylint: disable=broad-except  # A config file that fails to load.
    raise errors.UserError(f'{type(e).__name__}: {e}') from None
  if nones:
    config = flags.FLAGS[name].value
    for path in nones:
      try:
        parent, key = _field(config, path)
      except KeyError:
        raise errors.UserError(_unknown_field(config, path)) from None
      if not _nullable(parent, key):
        raise errors.UserError(f'--{name}.{path}=None: this field cannot be None (its value is '
                               f'{parent[key]!r}).')
      with parent.unlocked():
        parent[key] = None
  return rest


def _nullable(parent, key) -> bool:
  """Whether the config declares ``key`` as one that may be None (a typed FieldReference)."""
  from ml_collections import FieldReference  # pylint: disable=g-import-not-at-top
  fields = getattr(parent, '_fields', {})
  return isinstance(fields.get(key), FieldReference) or parent[key] is None
