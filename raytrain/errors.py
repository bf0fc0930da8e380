"""How a run or a search ends on purpose: the outcomes the CLI reports with exit status 1 (a config error,
``section.ConfigError``, is 2)."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses); retrying would only repeat them."""


class StartFailed(RuntimeError):
    """The workers could not be placed within scaling.start_timeout_s."""


class SearchFailed(RuntimeError):
    """No trial of a search produced its objective."""
