"""Shared by every test module.

torch must be imported before TensorFlow in one process: importing it after TensorFlow segfaults
(triton's native library, pulled in by timm). The data tests import TensorFlow and the parity test
timm, and pytest runs them in one process, so torch comes first here when it is installed.
"""

try:
  import timm  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass
