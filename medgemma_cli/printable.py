"""Text from files (names, DICOM strings, notes' names) made safe to print: a file name that is not UTF-8, or a
DICOM string holding an escape sequence, must neither crash the output nor reach the terminal as a command."""

from __future__ import annotations

import os
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # newlines too: what is shown is one line


def printable(text: object) -> str:
    """`text` with undecodable bytes (surrogate escapes from os.fsdecode) as `\\xNN` and control characters
    (ESC, BEL, CR, newlines…) as `\\xNN`/`\\n`; printable Unicode is left alone."""
    s = str(text)
    if any("\udc80" <= c <= "\udcff" for c in s):  # a name that was not UTF-8 on disk
        s = os.fsencode(s).decode("utf-8", "backslashreplace")
    elif any("\ud800" <= c <= "\udfff" for c in s):
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], s)
