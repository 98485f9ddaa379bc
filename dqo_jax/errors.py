"""The project's one user-facing error type, importable without the command line's flags."""


class UserError(Exception):
  """Bad input: reported as one line, without a traceback."""
