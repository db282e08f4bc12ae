"""The one error type of the corpus pipeline.

Every problem a user can fix (a wrong path, a missing field, a corpus too short, an
unreachable hub) surfaces as a `CorpusError` whose message is one line naming the fix.
It subclasses the project's InputError (a ValueError) so that argument-validation code
that already catches ValueError keeps working, so that the command line prints it as one
line, and so that a DataLoader worker can re-raise it in the main process (torch rebuilds
worker exceptions as `type(exc)(message)`).
"""
from tamt_ds.errors import InputError


class CorpusError(InputError):
    pass
