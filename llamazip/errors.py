"""The one base type of every error a user can cause (a bad file, flag, model or request).

`main` catches it once and prints one `error: ...` line; the server answers it
with a 400. Each part of the code subclasses it for its own errors, so a
message says where it came from while the catching stays in one place.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one `error: ...` line."""
