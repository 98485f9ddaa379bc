"""The one exception type for bad input, reported by the command line as one line."""


class UserError(Exception):
  """Bad input (config, data, workdir): the message names the fix; no traceback is shown."""
