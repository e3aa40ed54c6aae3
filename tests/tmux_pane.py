"""A command in a tmux pane of a given size, driven by keys and read back as the screen shows it.

Each Pane runs on a tmux server of its own (`-L`, a socket named for it), so tests neither see nor touch any other
tmux session, and `close()` ends that server and what runs in it. The pane stays after its command exits
(remain-on-exit), so the last screen and the exit status can still be read.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable

_names = itertools.count()


class Pane:
    def __init__(self, cmd: list[str], width: int = 80, height: int = 24) -> None:
        self.socket = f"tokenbus-test-{os.getpid()}-{next(_names)}"
        # in the server's configuration, so that it holds before the command starts (a command that fails at once)
        fd, self._conf = tempfile.mkstemp(prefix="tmux-", suffix=".conf")
        os.write(fd, b"set -g remain-on-exit on\n")
        os.close(fd)
        size = ["-x", str(width), "-y", str(height)]
        self._tmux("-f", self._conf, "new-session", "-d", "-s", "t", *size, shlex.join(cmd))

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

    def exit_status(self) -> int | None:
        """The command's exit status once it has ended (minus the signal that ended it), else None."""
        fields = "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}"
        dead, status, sig = self._tmux("display-message", "-p", "-t", "t", fields).strip().split(":")
        if dead != "1" or not (status or sig):  # tmux may mark the pane dead before it has the status
            return None
        return int(status) if status else -int(sig)

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.exit_status()
            if status is not None:
                return status
            time.sleep(0.05)
        raise AssertionError(f"the command did not exit within {timeout} s; it shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)
        os.unlink(self._conf)
