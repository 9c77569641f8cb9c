"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import shutil


def die_with_parent() -> list[str]:
    """A command prefix under which the child gets SIGTERM when the thread that started it
    dies, even by SIGKILL (util-linux setpriv sets the kernel's parent-death signal, which
    exec keeps); empty where setpriv is missing."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
