"""The one exception type for mistakes a user can fix (flags, config, data, workdir).

Entry points print these as a single line instead of a traceback; everything else is a bug
and keeps its traceback.
"""


class JaxsegError(ValueError):
  """A user-facing error whose message says what is wrong and what to change."""


def first_line(error: BaseException) -> str:
  """An exception's first message line (library errors can run to pages), or its type name."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
