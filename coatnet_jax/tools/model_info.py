"""Parameters and GMACs of CoAtNet variants next to the paper's figures (tracing only, CPU is fine).

Parameters are counted at 224 (the relative-bias tables grow with the input size); GMACs are for
one image, eval mode. Differences are ours relative to the paper's.

Usage:
  python -m coatnet_jax.tools.model_info [--models=coatnet_0,coatnet_1] [--resolutions=224,384]
      [--num_classes=1000] [--markdown]
"""

import time

from absl import flags, logging

from coatnet_jax import cli

from coatnet_jax import cost
from coatnet_jax import errors
from coatnet_jax.models import PAPER_GMACS, PAPER_PARAMS, get_model

_MODELS = flags.DEFINE_list('models', [f'coatnet_{i}' for i in range(8)], 'Variants to report.')
_RESOLUTIONS = flags.DEFINE_list('resolutions', ['224', '384', '512'], 'Square input sizes.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classifier width.')
_MARKDOWN = flags.DEFINE_bool('markdown', False, 'Print a Markdown table instead of plain text.')


def _diff(ours: float, paper) -> str:
  return '-' if paper is None else f'{100 * (ours / paper - 1):+.1f}%'


def _row(name: str, resolutions: list[int], num_classes: int) -> list[str]:
  model = get_model(name, num_classes)
  params = cost.param_count(model, 224)
  paper_params = PAPER_PARAMS.get(name)
  row = [name, f'{params / 1e6:.2f}', '-' if paper_params is None else f'{paper_params / 1e6:g}',
         _diff(params, paper_params)]
  for res in resolutions:
    gmacs = cost.model_macs(model, res) / 1e9
    paper = PAPER_GMACS.get(name, {}).get(res)
    row += [f'{gmacs:.2f}', '-' if paper is None else f'{paper:g}', _diff(gmacs, paper)]
  return row


def _format(header: list[str], rows: list[list[str]], markdown: bool) -> str:
  if markdown:
    lines = [header, ['---'] + ['---:'] * (len(header) - 1)] + rows
    return '\n'.join('| ' + ' | '.join(cells) + ' |' for cells in lines)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  return '\n'.join('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
                   for r in [header] + rows)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Bad input ends in one line on stderr (exit status 1), before any tracing.
  for name in _MODELS.value:
    try:
      get_model(name, _NUM_CLASSES.value)
    except ValueError as e:
      raise errors.UserError(e) from e
  try:
    resolutions = [int(r) for r in _RESOLUTIONS.value]
  except ValueError:
    raise errors.UserError(f'--resolutions must be integers, got '
                           f'{",".join(_RESOLUTIONS.value)}.') from None

  header = ['model', 'params (M)', 'paper (M)', 'diff']
  for res in resolutions:
    header += [f'GMACs@{res}', 'paper', 'diff']
  start, rows = time.perf_counter(), []
  for name in _MODELS.value:
    t = time.perf_counter()
    rows.append(_row(name, resolutions, _NUM_CLASSES.value))
    logging.info('%s traced in %.1f s', name, time.perf_counter() - t)
  print(_format(header, rows, _MARKDOWN.value))
  logging.info('Total %.1f s', time.perf_counter() - start)


if __name__ == '__main__':
  cli.run(main)
