"""Errors users can act on. The CLI prints their message as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""

    exit_code = 2


class SpecError(UserError):
    """The job spec is invalid (raised before anything is reserved)."""


class JobNotFound(UserError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}; 'trainctl list' shows the jobs")


class NonRetryableError(Exception):
    """Raise from training code to fail the job at once instead of restarting it."""
