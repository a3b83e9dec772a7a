"""Errors users can act on. The CLI prints their message as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""

    exit_code = 2

    def __reduce__(self):
        # Pickled across Ray (a controller call) the default rebuilds `cls(*self.args)`, which
        # runs a subclass's __init__ on the finished message and wraps it a second time.
        return _rebuild, (type(self), str(self)), self.__dict__


def _rebuild(cls: type[UserError], message: str) -> UserError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


class SpecError(UserError):
    """The job spec is invalid (raised before anything is reserved)."""


class JobNotFound(UserError):
    """An unknown job id, from every verb and `Client` method that takes one."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}; 'trainctl list' shows the jobs")


class NonRetryableError(Exception):
    """Raise from training code to fail the job at once instead of restarting it."""
