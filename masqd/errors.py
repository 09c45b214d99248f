"""Every error masqd raises on purpose, in one hierarchy.

    MasqdError                  base: anything masqd reports as a user-facing problem
    ├── ConfigError             the config (a file, a ConfigMap) cannot be used; carries every Problem found
    │   ├── PluginError         a plugin raised, hung, returned something unusable, or vetoed the
    │                           config; each Problem's key is PLUGIN.HOOK
    │   └── SnatAddressError    the new state SNATs to an address no interface of masqd's network
    │                           namespace holds (refused until it does)
    ├── PluginLoadError         a plugin cannot be loaded at start-up
    ├── FlagError               a command-line flag value is invalid (e.g. ``--to-ports 70000``);
    │                           raised only while a command line is read, never by the running daemon
    ├── SourceReadError         a one-shot command could not read an event source it needs (the
    │                           Kubernetes API objects of ``--kube-configmap``, a plugin's source)
    ├── EndpointError           the HTTP endpoint cannot listen on its address (the daemon retries)
    ├── KubeError               the Kubernetes API cannot be used
    │   ├── CredentialsError    no usable credentials at start-up
    │   └── ApiWriteError       the API refused a write, or kept conflicting (the controller)
    └── BackendError            the kernel could not be read or written
        ├── BackendUnsupported  the backend cannot do what was asked (``explain --live`` of a
        │                       backend without ``read_back``)
        ├── ToolMissingError    a kernel tool could not be started (not installed, not executable)
        ├── ApplyError          a write (``iptables-restore``) was refused; the kernel kept its old rules
        ├── ElementsRefusedError nf_tables refused a change of a set's elements, sent over netlink
        │                       (the nftables backend then reads back and rewrites the table)
        ├── ReadBackError       the current state could not be read (``iptables-save`` failed)
        │   └── ToolExitedError a tool that reports until stopped (``nft monitor``) exited
        └── ToolTimeoutError    a kernel tool hung past its deadline and was killed (see
                                :mod:`masqd.backends.tools`); the kernel kept its old rules or
                                took the new ones whole

Every message names the input it is about and says what would be valid, so that a log line
or the exit message of ``masqd validate`` is enough to fix the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def safe_repr(value: object) -> str:
    """``repr(value)``, or a stand-in when the object's own ``__repr__`` fails (plugin objects)."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object whose repr() failed>"


def truncate(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters (ending in "...") when longer."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shorten(value: object) -> object:
    """``value`` itself when its repr is short, else the first 77 characters of the repr and
    "...": problems show what was wrong without pasting a 100k-item list into a log line."""
    try:
        text = repr(value)
    except Exception:
        return safe_repr(value)  # its repr fails: keep only the stand-in text
    return value if len(text) <= 80 else truncate(text, 80)


#: At most this much of what a tool printed on stderr is kept, for its error (and so the log and
#: ``/readyz``): the first and the last half, with a marker between saying how much was left out.
#: A tool printing megabytes must not make a log line (or a ``/readyz`` answer) of megabytes.
KEPT_OUTPUT = 4096
#: Text longer than the bound by at most this much passes whole: it was kept while it was read
#: (:func:`masqd.backends.tools.run_tool`) and holds its marker already.
_MARKER_ROOM = 200
_UNUSUAL = re.compile(r"[^\t\n -~]")
_DETAILS = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


def left_out(count: int, unit: str = "bytes") -> str:
    """The marker standing where ``count`` bytes (or characters) of a tool's output were left out."""
    return f"[... {count} {unit} left out ...]"


def printable(text: str) -> str:
    """``text`` with every character that is not printable, newline and tab aside, written as its
    escape (``\\x1b``, ``\\x00``, ``\\r``, ``\\u202e``): what a tool printed cannot move a
    terminal's cursor, end a log line early, hide text or cut the ``/readyz`` answer."""
    return _UNUSUAL.sub(_escaped, text)


def _escaped(match: re.Match) -> str:
    character = match.group()
    return character if character.isprintable() else repr(character)[1:-1]


def kept_output(text: str, limit: int = KEPT_OUTPUT) -> str:
    """What a message shows of a tool's output ``text``: stripped, cut to its first and last
    ``limit // 2`` characters when longer than ``limit``, and :func:`printable`."""
    text = text.strip()
    if len(text) > limit + _MARKER_ROOM:
        half = limit // 2
        text = f"{text[:half]}\n{left_out(len(text) - 2 * half, 'characters')}\n{text[-half:]}"
    return printable(text)


def without_details(text: str) -> str:
    """``text`` with its numbers and quoted values left out: what stays names the kind of thing
    said (``line 7`` and ``line 9``, ``'a'`` and ``'b'`` alike)."""
    return _DETAILS.sub("#", text)


class MasqdError(Exception):
    """Base class of all errors masqd reports to the user."""

    @property
    def kind(self) -> tuple:
        """What sort of failure this is, its details left out: the reconciler logs repeats of one
        kind at most once a minute, however their texts differ (a tool's output that changes on
        every run, a file growing past the size limit). By default the class and the message
        without its numbers and quoted values; subclasses say more precisely."""
        return (type(self).__name__, without_details(str(self)))


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input: where (``key``), what (``value``), and what is valid (``reason``)."""

    key: str
    value: object  # None when the problem is about the key itself (e.g. an unknown key)
    reason: str

    def __str__(self) -> str:
        # A key from the file is shown quoted when it holds anything unprintable (a newline must
        # not be able to start a fake line of its own in `masqd validate` output).
        key = self.key if self.key.isprintable() else repr(self.key)
        if self.value is None:
            return f"{key}: {self.reason}"
        return f"{key}: {self.value!r}: {self.reason}"


class ConfigError(MasqdError):
    """The configuration cannot be used. ``problems`` lists every problem found, not just the first;
    ``warnings`` the non-fatal findings (an unknown key often explains a problem)."""

    def __init__(self, source: str, problems: list[Problem] | tuple[Problem, ...], warnings: tuple[Problem, ...] = ()):
        self.source = source
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        lines = "; ".join(str(p) for p in self.problems)
        super().__init__(f"invalid config {source}: {lines}")

    @property
    def kind(self) -> tuple:
        """The class, the source, and each problem's key and reason without numbers and quoted
        values: a file growing past the size limit, or YAML broken at another line each time it
        is saved, is one kind of rejection; another key or reason is another."""
        return (type(self).__name__, self.source,
                tuple((without_details(p.key), without_details(p.reason)) for p in self.problems))


class PluginError(ConfigError):
    """Plugins made the new desired state unusable (see :mod:`masqd.plugins`). It is handled like
    an invalid config: the rules last applied stay. Each problem's ``key`` is ``PLUGIN.HOOK`` (with
    ``[INDEX]`` for one item of a returned list), e.g. ``policy-guard.validate_config``."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...], warnings: tuple[Problem, ...] = ()):
        super().__init__("plugins", problems, warnings)


class SnatAddressError(ConfigError):
    """The new desired state SNATs to an address (``snatToAddress``, ``snatToAddressIPv6``) that no
    interface of masqd's network namespace holds: the kernel would rewrite traffic to an address
    replies never come back to. Handled like an invalid config (the rules last applied stay);
    masqd checks again whenever an address of the namespace changes. Each problem's key is the
    config key, its value the address."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]):
        super().__init__("node addresses", problems)
        self.args = (f"new state refused: {'; '.join(str(p) for p in self.problems)}",)


class PluginLoadError(MasqdError):
    """A plugin cannot be loaded at start-up (import failure, unknown hook, bad signature, a name
    in ``MASQD_PLUGINS`` that is not installed). ``plugin`` names it."""

    def __init__(self, plugin: str, reason: str):
        self.plugin = plugin
        self.reason = reason
        super().__init__(f"plugin {plugin}: {reason}")


class FlagError(MasqdError):
    """A command-line flag has a value masqd cannot use."""

    def __init__(self, flag: str, value: object, reason: str):
        self.flag = flag
        self.value = value
        self.reason = reason
        super().__init__(f"--{flag}={value}: {reason}")


class SourceReadError(MasqdError):
    """A one-shot command (``validate``, ``render``, ``run --once``, ``explain``) could not read an
    event source it needs once (see :func:`masqd.hookspecs.register_sources`): the Kubernetes API
    did not answer, or a plugin's source failed. ``source`` names it."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read {source}: {reason}")


class EndpointError(MasqdError):
    """The HTTP endpoint cannot listen on ``address`` (the flag's value); the daemon logs it and
    tries again later, masquerading all the while. The message names the flag to change."""

    def __init__(self, address: str, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(f"--http-address={address}: cannot listen there: {reason}")


class KubeError(MasqdError):
    """The Kubernetes API cannot be used (one of the subclasses says how). Watches never raise it:
    they retry (see :mod:`masqd.kube`)."""


class CredentialsError(KubeError):
    """No usable Kubernetes credentials: the message says what was tried and what to pass."""


class ApiWriteError(KubeError):
    """The API refused a write, or it kept conflicting past the retries (the controller)."""


class BackendError(MasqdError):
    """The backend could not talk to the kernel, or the kernel refused the rules.

    ``written`` names the parts (e.g. ``("ipv4",)``) that were already written in the same sync
    before the failure; every other part still holds what it held before.
    """

    written: tuple[str, ...] = ()


class BackendUnsupported(BackendError):
    """The backend cannot do what was asked: ``backend`` names it (the ``--backend`` value),
    ``reason`` says what it lacks and what to do instead."""

    def __init__(self, backend: str, reason: str):
        self.backend = backend
        self.reason = reason
        super().__init__(f"--backend={backend}: {reason}")


class ToolMissingError(BackendError):
    """A kernel tool could not be started (``command[0]`` is not installed, or not executable)."""

    def __init__(self, command: list[str], detail: str):
        self.command = list(command)
        self.detail = detail.strip()
        super().__init__(f"{' '.join(self.command)}: cannot run {self.command[0]}: {self.detail}")


class ApplyError(BackendError):
    """A write was refused by the kernel tool; the kernel kept the rules it had before.

    ``command`` is the argv that failed, ``stderr`` what it printed (as much as is kept of it,
    printable: :func:`kept_output`), ``line`` the input line it complained about when it named one.
    """

    def __init__(self, command: list[str], returncode: int, stderr: str, line: str | None = None):
        self.command = list(command)
        self.returncode = returncode
        self.stderr = kept_output(stderr)
        self.line = line
        where = f" (input line: {line})" if line else ""
        super().__init__(f"{' '.join(self.command)} exited {returncode}: {self.stderr}{where}")

    @property
    def kind(self) -> tuple:
        """The command and its exit status: what it printed may differ on every run."""
        return (type(self).__name__, tuple(self.command), self.returncode)


class ElementsRefusedError(BackendError):
    """nf_tables refused a change of a set's elements, so it applied none of the transaction.
    ``what`` says what the refused part did (``removing 1 intervals from set ip masqd nonmasq4``),
    ``reason`` the kernel's error."""

    def __init__(self, what: str, reason: str):
        self.what = what
        self.reason = reason
        super().__init__(f"nf_tables refused {what}: {reason}; nothing of the transaction was applied")


class ReadBackError(BackendError):
    """The current kernel state could not be read. ``detail`` says why (what the tool printed: as
    much as is kept of it, printable: :func:`kept_output`)."""

    def __init__(self, command: list[str], detail: str):
        self.command = list(command)
        self.detail = kept_output(detail)
        super().__init__(f"{' '.join(self.command)}: {self.detail}")

    @property
    def kind(self) -> tuple:
        """The command: what it printed may differ on every run."""
        return (type(self).__name__, tuple(self.command))


class ToolExitedError(ReadBackError):
    """A tool meant to run until masqd stops it (``nft monitor``) exited on its own: ``returncode``
    is its exit status (negative: the signal that ended it), ``stderr`` what it printed."""

    def __init__(self, command: list[str], returncode: int, stderr: str):
        self.returncode = returncode
        self.stderr = kept_output(stderr)
        said = f": {self.stderr}" if self.stderr else " without a message"
        super().__init__(command, f"exited with status {returncode}{said}")

    @property
    def kind(self) -> tuple:
        return (type(self).__name__, tuple(self.command), self.returncode)


class ToolStoppedError(BackendError):
    """A kernel tool that only reads was killed because the daemon is stopping (SIGTERM). The read
    wrote nothing (what the sync wrote before it, ``written`` says)."""

    def __init__(self, command: list[str]):
        self.command = list(command)
        super().__init__(f"{' '.join(self.command)} was stopped: masqd is shutting down")


class ToolTimeoutError(BackendError):
    """A kernel tool (``iptables-save``, ``iptables-restore``, ``nft``) did not finish within
    ``timeout`` seconds and was killed. ``wrote``: it was writing (it had input). The tools commit
    all or nothing, so the kernel holds the rules it had or, for a write killed after its commit,
    all of the new ones: which one is unknown until the next sync reads back. ``exited`` is False
    when the killed process had still not exited after the grace period (stuck in the kernel); it
    is reaped when it does."""

    def __init__(self, command: list[str], timeout: float, *, exited: bool = True, wrote: bool = False):
        self.command = list(command)
        self.timeout = timeout
        self.exited = exited
        self.wrote = wrote
        stuck = ("; it has not exited yet (stuck in the kernel: a wedged lock or uninterruptible "
                 "I/O), and is reaped when it does" if not exited else "")
        held = ("the kernel holds either the rules it had or all of the new ones (a write is committed whole or "
                "not at all), which is read back on the next sync" if wrote else
                "nothing was written; the next sync reads back again")
        super().__init__(f"{' '.join(self.command)} did not finish within {round(timeout, 1):g} s and was killed; {held}{stuck}")
