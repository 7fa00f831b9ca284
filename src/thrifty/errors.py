"""Typed errors. Each names its cause and, where one exists, the fix.

The CLI prints them as one line and exits 2; the server maps them to HTTP status codes in one place.
"""
from __future__ import annotations


class ThriftyError(Exception):
    """Base of every error thrifty raises on purpose."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class ModelNotFoundError(ThriftyError):
    """A model name that is neither in the zoo nor a path that exists."""


class ModelFileError(ThriftyError):
    """A model file that is missing, truncated or corrupt."""


class ChecksumError(ModelFileError):
    """An assembled model file whose SHA-256 is not the recorded one."""


class UnsupportedModelError(ThriftyError):
    """A well-formed model of an architecture or tensor type thrifty cannot run."""


class InstallError(ThriftyError):
    """pip could not install a model's packages."""


class InvalidRequestError(ThriftyError, ValueError):
    """Bad parameters of a request (sampling parameters, prompt too long, ...)."""

    def __init__(self, message: str, fix: str = "", param: str | None = None) -> None:
        super().__init__(message, fix)
        self.param = param


class ModelNotServedError(ThriftyError):
    """A request for a model the gateway does not serve."""

    def __init__(self, model: str, served: str) -> None:
        super().__init__(f"the model '{model}' does not exist on this server", f"use '{served}' (see GET /v1/models)")
        self.param = "model"
