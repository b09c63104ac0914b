"""The one error path every command shares: what a user reads, and what stays a traceback."""

import errno

import pytest

from coatnet_jax import errors


def test_several_problems_are_one_error_line_each_and_exit_1(capsys):
  with pytest.raises(SystemExit) as e:
    with errors.exit_on_user_error():
      raise errors.UserError('batch_size=-8 must be\n  positive.', 'image_size=0: give > 0.')
  assert e.value.code == 1
  assert capsys.readouterr().err == ('error: batch_size=-8 must be positive.\n'
                                     'error: image_size=0: give > 0.\n')


def test_only_the_foreign_errors_a_command_names_become_one_line(capsys):
  with pytest.raises(SystemExit):
    with errors.exit_on_user_error(KeyError, ValueError):
      raise ValueError('')  # No message: its type names it.
  assert capsys.readouterr().err == 'error: ValueError\n'
  with pytest.raises(RuntimeError):  # A bug keeps its traceback.
    with errors.exit_on_user_error(ValueError):
      raise RuntimeError('bug')


def test_describe_puts_the_os_error_first():
  assert errors.describe(OSError(errno.ENOSPC, 'No space left on device')).startswith(
      'No space left on device (errno 28): OSError: ')
  buried = ValueError('Error writing local file "x": [' + 'y' * 500 + "] os_error_code='28'")
  text = errors.describe(buried)
  assert text.startswith('No space left on device (errno 28): ValueError: Error writing')
  assert text.endswith(' ...') and len(text) < 500
  assert errors.one_line('a\n  b', limit=1) == 'a ...' and errors.one_line('a\n b') == 'a b'
