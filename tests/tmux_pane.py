"""A command in a tmux pane of a given size, driven by keys and read back as the screen shows it.

Each Pane runs on a tmux server of its own (`-L`, a socket named for it), so tests neither see nor touch any other
tmux session, and `close()` ends that server and what runs in it. The command runs under bash, which prints its
exit status when it ends and then keeps the pane (and the last screen) open: tmux's own remain-on-exit was seen to
leave an exited command unreaped, and its pane never marked dead.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable

_names = itertools.count()
EXITED_RE = re.compile(r"\[exited (\d+)\]")


class Pane:
    def __init__(self, cmd: list[str], width: int = 80, height: int = 24) -> None:
        self.socket = f"tokenbus-test-{os.getpid()}-{next(_names)}"
        # bash, not sh: a Ctrl-C that the command handles leaves bash waiting for it (dash would exit on it)
        script = f'{shlex.join(cmd)}; echo "[exited $?]"; exec sleep 3600'
        size = ["-x", str(width), "-y", str(height)]
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", *size, shlex.join(["bash", "-c", script]))

    def _tmux(self, *args: str) -> str:
        # os.environ as Python sees it: readline (which pytest may load) exports COLUMNS and LINES of its own terminal
        # into the C environment only, and a server inheriting those would tell the pane's programs a wrong width
        run = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=30,
            check=True,
        )
        return run.stdout

    def screen(self, joined: bool = False) -> str:
        """What the pane shows; `joined` puts lines tmux wrapped back together."""
        return self._tmux("capture-pane", "-p", *(["-J"] if joined else []), "-t", "t")

    def keys(self, *keys: str) -> None:
        """tmux key names (`Tab`, `C-c`, `Enter`) or words typed as they are."""
        self._tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        """Polls the screen until `check` holds for it; that screen. Fails naming `what` and showing the last one."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if check(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{what}: not on the screen within {timeout} s; it shows:\n{screen}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The command's exit status (128 + the signal that ended it), once it has ended."""
        screen = self.wait_for(lambda s: EXITED_RE.search(s) is not None, "the command's end", timeout)
        return int(EXITED_RE.findall(screen)[-1])

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)
