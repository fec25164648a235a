"""Errors of the model registry helpers, and how MLflow says "missing" and "exists"."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)


class RegistryError(RuntimeError):
    pass


def not_found(e: MlflowException) -> bool:
    return e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def already_exists(e: MlflowException) -> bool:
    return e.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS)
