"""The exception types for mistakes a user can fix (bad path, bad setting, unsupported model).

The CLI turns them into a short message on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class FerryError(Exception):
    """A problem with the user's input, explained in the message."""


class SettingError(FerryError):
    """A setting with a value it cannot take. `setting` is the option's name as `ferry.load`
    takes it (the CLI maps it to its flag), `problem` the rest of the sentence."""

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{setting} {problem}")
