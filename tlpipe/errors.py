"""Errors a stage raises to fail loudly: each message names what failed and by how much."""


class TlpipeError(Exception):
    """Base of every error tlpipe reports to the user as a one-line failure."""


class DataError(TlpipeError):
    """The input data is missing, unreadable or not what params.yaml describes."""


class GateFailed(TlpipeError):
    """A gate (validation, transfer gain, ONNX parity, promotion) missed its threshold."""


class StoreError(TlpipeError):
    """The S3-compatible store could not be started, reached or written."""


class CurveError(TlpipeError):
    """The curve's finished runs are not the ones its plan names: one is missing, repeated or
    not in the plan."""
