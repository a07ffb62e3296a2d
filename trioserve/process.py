"""The process around the server: working directory, umask, pid file, and dropping root.

Order, as :func:`trioserve.cli.main` applies it (one process, or the supervisor
of ``-w N`` / ``--reload``, whose workers inherit the result):

1. :func:`prepare_process`: ``--chdir`` (so relative paths in the other
   options, the app's module and ``--reload-dir`` are taken from there),
   ``--umask``, and the checks ``--user``/``--group`` need (root, and a user
   and group that exist), all before anything is created or bound;
2. the logs are opened, then :func:`pid_file` writes ``--pid``;
3. the sockets are bound (as root, so ports below 1024 work);
4. :func:`drop_privileges` switches to ``--user``/``--group`` for good
   (supplementary groups: the user's own), and only then is the app imported
   and are the TLS files read: make them readable by that user or group (on
   Debian, the ``ssl-cert`` group). SIGHUP reads them again as that user.

5. once the app is loaded and the server serves, :func:`tune_garbage_collector`
   (``--gc-threshold``), in each process that serves.

What the server creates after the switch belongs to the user; what root created
before it (the pid file, a unix socket file in a root-owned directory) may then
not be removable at exit, which is harmless: the next start replaces both.
"""

from __future__ import annotations

import contextlib
import gc
import grp
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ConfigError
from .spill import writable_directory

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class Identity:
    """Who to become: a uid (None: keep), a gid, and the user name for its groups."""

    uid: int | None
    gid: int
    user_name: str | None


def prepare_process(config: Config) -> Identity | None:
    """Apply ``--chdir`` and ``--umask``; check ``--user``/``--group`` and ``--reload-dir``.

    Returns:
      who to become once bound, or None when neither ``--user`` nor ``--group`` is given.

    Raises:
      ConfigError: one line naming the option.
    """
    if config.chdir is not None:
        try:
            os.chdir(config.chdir)
        except OSError as exc:
            raise ConfigError(f"--chdir {config.chdir}: {exc.strerror or exc}") from None
    if config.umask is not None:
        os.umask(int(config.umask, 8))
    if config.spill_dir is not None and not writable_directory(config.spill_dir):
        raise ConfigError(f"--spill-dir {config.spill_dir}: not a directory this process can write")
    if config.reload:
        for directory in config.reload_dir:
            if not os.path.isdir(directory):
                raise ConfigError(f"--reload-dir {directory}: not a directory")
    return _identity(config)


def _identity(config: Config) -> Identity | None:
    if config.user is None and config.group is None:
        return None
    if os.geteuid() != 0:
        flag, value = (
            ("--user", config.user) if config.user is not None else ("--group", config.group)
        )
        raise ConfigError(
            f"{flag} {value}: only root can switch to another {flag[2:]}"
            f" (trioserve runs as uid {os.geteuid()})"
        )
    uid, gid, name = None, os.getegid(), None
    if config.user is not None:
        try:
            entry = pwd.getpwuid(int(config.user)) if config.user.isdigit() else None
            entry = entry or pwd.getpwnam(config.user)
        except KeyError:
            raise ConfigError(f"--user {config.user}: no such user") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if config.group is not None:
        try:
            group = grp.getgrgid(int(config.group)) if config.group.isdigit() else None
            group = group or grp.getgrnam(config.group)
        except KeyError:
            raise ConfigError(f"--group {config.group}: no such group") from None
        gid = group.gr_gid
    return Identity(uid, gid, name)


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` for good: groups first, the user last (after which we cannot)."""
    if identity.user_name is not None:
        os.initgroups(identity.user_name, identity.gid)
    else:
        os.setgroups([identity.gid])
    os.setgid(identity.gid)
    if identity.uid is not None:
        os.setuid(identity.uid)


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write our pid to ``path`` for the duration; removed after, if it still names us.

    Raises:
      ConfigError: the file cannot be written.
    """
    if path is None:
        yield
        return
    pid = str(os.getpid())
    try:
        with open(path, "w", encoding="ascii") as file:
            file.write(pid + "\n")
    except OSError as exc:
        raise ConfigError(f"--pid {path}: cannot write it: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        try:
            with open(path, encoding="ascii") as file:
                ours = file.read().strip() == pid
            if ours:
                os.unlink(path)
        except OSError:
            pass  # gone already, or not ours to remove any more


def tune_garbage_collector(threshold: int) -> None:
    """``--gc-threshold``: collect less often, and never scan startup's objects again.

    Python collects its youngest generation after 700 new container objects
    (2000 from Python 3.13), every few dozen requests here. At that moment the
    requests in flight are young, so each collection scans them and promotes
    them, and enough promotions bring a collection of the whole heap (the
    modules, the app). A threshold of ``threshold`` makes all of that rarer,
    and ``gc.freeze()`` puts what exists once the server is up into the
    permanent generation, which no collection scans. Garbage in reference
    cycles is still found, a little later. Called by the command only: a
    program embedding ``serve_wsgi`` keeps its process's settings. 0 changes
    nothing.
    """
    if not threshold:
        return
    gc.collect()  # what startup left as garbage is not frozen with the rest
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
