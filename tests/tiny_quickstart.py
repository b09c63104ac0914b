"""The tests' tiny run: the quickstart (digits at 32x32) with ``test_tiny``, a layout the variant
table lacks, written out in ``model.extra_variants`` as any config may: every block kind, as small
as it gets, a few seconds to compile.

  python tests/fault_main.py --config tests/tiny_quickstart.py:smoke --workdir DIR
"""

from configs import quickstart

TEST_TINY = dict(stem_width=8, head_size=8,
                 stages=((('C', 8, 1),), (('C', 16, 1),), (('T', 16, 1),), (('T', 16, 1),)))


def get_config(arg=None):
  c = quickstart.get_config(arg)
  c.model.extra_variants.test_tiny = TEST_TINY
  c.model.name = 'test_tiny'
  return c
