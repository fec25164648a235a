"""Errors of the model registry helpers, and how MLflow says "missing" and "exists"."""

from __future__ import annotations

from mlflow import MlflowClient
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


def delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    """Remove a registered model's alias; one that is already gone is no error (the state the
    caller wants holds either way)."""
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as e:
        if not not_found(e):
            raise
