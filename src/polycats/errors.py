"""User-facing errors: one line naming the file/field and what to do. The CLI prints them
without a traceback (unless --debug) and exits non-zero."""


class PolycatsError(Exception):
    pass
