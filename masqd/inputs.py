"""Config inputs: where config text comes from.

An input holds zero or more config texts at any moment: a file (present or missing), a
directory of ``ip-masq*`` files (each one a text, as Azure's fork reads a user-owned and a
provider-owned ConfigMap side by side), or the ``config`` key of a ConfigMap read through the
Kubernetes API (:class:`ConfigMapInput`). The reconciler reads every input on each pass, parses
each text on its own and merges them (:func:`masqd.config.merge_configs`); an absent text
contributes nothing, and only when no text is present do the defaults apply.

Each input also names the event source that watches it (``watcher()``, see :mod:`masqd.sources`),
which the built-in sources plugin registers, so a change to any input reaches the reconciler at
once. Inputs are read; event sources only say that something may have changed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from masqd.config import (MAX_CONFIG_BYTES, AgentOptions, MasqConfig, MergedConfig, ParsedConfig, merge_configs,
                          parse_config, too_large_problem)
from masqd.errors import ConfigError, Problem, shorten
from masqd.sources.files import ConfigDirectorySource, ConfigFileSource, read_config_text, read_limited

if TYPE_CHECKING:  # the API client library is imported only when an API input is used
    from masqd.kube.settings import KubeSettings, ObjectRef
    from masqd.sources.kube import ReflectorSource

log = structlog.get_logger("masqd.inputs")

#: A file in a config directory is a config text when its name starts with this (Azure's
#: ip-masq-agent-v2 convention: ``ip-masq-agent``, ``ip-masq-agent-reconciled``, ...).
DIRECTORY_PREFIX = "ip-masq"
#: The ConfigMap key holding the config, as in the upstream agent's volume mount.
CONFIG_KEY = "config"
#: ``--config -``: the config is read from standard input (``validate``, ``render``, ``explain``).
STDIN = "-"
#: Why a missing config file is not an error, said wherever one is reported.
MISSING_ALLOWED = "a missing config file is allowed, as for an optional ConfigMap"


@dataclass(frozen=True, slots=True)
class ConfigText:
    """One present config text: its name (a path, ``configmap NAMESPACE/NAME``) and the text.
    ``key`` identifies it when two inputs can hold the same text (a file's absolute path)."""

    name: str
    text: str
    key: str = ""


class ConfigInput(Protocol):
    """Something holding config texts. ``read()`` returns the texts present now (reading files is
    the only I/O allowed: it runs on every reconcile) and raises :class:`ConfigError` when a text
    exists but cannot be read. ``watcher()`` is the event source that watches it, or ``None``."""

    name: str

    def read(self) -> list[ConfigText]: ...

    def watcher(self) -> object | None: ...


class FileInput:
    """One config file (``--config``): a config text when the file exists. ``present`` says
    whether it did at the last :meth:`read` (``None`` before the first)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.name = str(path)
        self.present: bool | None = None

    def read(self) -> list[ConfigText]:
        text = _read_text(self.path, self.name)
        self.present = text is not None
        return [] if text is None else [ConfigText(self.name, text, os.path.abspath(self.path))]

    def watcher(self) -> ConfigFileSource:
        return ConfigFileSource(self.path)

    def __repr__(self) -> str:
        return f"FileInput({self.name!r})"


class StdinInput:
    """``--config -``: the config text on standard input, read once (at the first :meth:`read`),
    for the one-shot commands; nothing watches it, so ``run`` refuses it."""

    name = "<stdin>"

    def __init__(self) -> None:
        self._text: str | None = None

    def read(self) -> list[ConfigText]:
        if self._text is None:
            data = read_limited(sys.stdin.buffer, MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(self.name, [too_large_problem("<stdin>", f"more than {MAX_CONFIG_BYTES} bytes")])
            try:
                self._text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise _not_utf8(self.name, "<stdin>", None, exc) from None
        return [ConfigText(self.name, self._text)]

    def watcher(self) -> None:
        return None

    def __repr__(self) -> str:
        return "StdinInput()"


class DirectoryInput:
    """Every regular file named ``ip-masq*`` in a directory (``--config-dir``), in name order.
    Hidden entries (a ConfigMap mount's ``..data``) are skipped; a missing directory holds none."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.name = str(path)

    def files(self) -> list[Path]:
        try:
            entries = sorted(os.scandir(self.path), key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise ConfigError(self.name, [Problem("<directory>", self.name, f"cannot list: {exc.strerror or exc}")]) from None
        return [Path(entry.path) for entry in entries
                if entry.name.startswith(DIRECTORY_PREFIX) and _is_file(entry)]

    def read(self) -> list[ConfigText]:
        found = []
        for path in self.files():
            text = _read_text(path, str(path))
            if text is not None:  # removed between listing and reading
                found.append(ConfigText(str(path), text, os.path.abspath(path)))
        return found

    def watcher(self) -> ConfigDirectorySource:
        return ConfigDirectorySource(self.path, self.files, prefix=DIRECTORY_PREFIX)

    def __repr__(self) -> str:
        return f"DirectoryInput({self.name!r})"


class ConfigMapInput:
    """The ``config`` key of one ConfigMap, read through the API (``--kube-configmap``).

    A config text while the ConfigMap exists and has the key; absent (not created yet, deleted,
    or before the first list arrives) it contributes nothing, so with no other input the defaults
    apply: deleting the ConfigMap is the documented way back to default SNAT behaviour. While the
    API is unreachable the last text seen stays. Its watcher keeps the copy current
    (:meth:`update`); one-shot commands call the watcher's ``read_once`` instead.
    """

    def __init__(self, ref: ObjectRef, settings: KubeSettings):
        self.ref = ref
        self.settings = settings
        self.name = f"configmap {ref}"
        self.text: object = None  # the ``config`` value: a str, or anything else a server sent (read() refuses it)
        self.resource_version: str | None = None  # of the object whose text is held
        self._missing_key_logged: str | None = None

    def read(self) -> list[ConfigText]:
        if self.text is None:
            return []
        if not isinstance(self.text, str):  # the API types it as a string; refuse anything else by name
            raise ConfigError(self.name, [Problem(f"data.{CONFIG_KEY}", shorten(self.text),
                                                  "expected a string holding the config (YAML or JSON)")])
        return [ConfigText(self.name, self.text)]

    def watcher(self) -> ReflectorSource:
        """A watch on this one ConfigMap (``fieldSelector=metadata.name=NAME``) feeding :meth:`update`."""
        from lightkube.resources.core_v1 import ConfigMap

        from masqd.sources.kube import ReflectorSource

        return ReflectorSource("configmap", ConfigMap, self.settings, self.update, namespace=self.ref.namespace,
                               fields={"metadata.name": self.ref.name}, what=f"configmap {self.ref}")

    def update(self, objects: dict[str, Any]) -> str | None:
        """Take the watch's copy; returns why to reconcile when the config text changed."""
        obj = objects.get(self.ref.name)
        text = None
        if obj is not None:
            data = obj.data or {}
            text = data.get(CONFIG_KEY)
            if text is None and self._missing_key_logged != obj.metadata.resourceVersion:
                log.warning(f"ConfigMap has no '{CONFIG_KEY}' key; it contributes nothing", configmap=str(self.ref),
                            keys=sorted(data))
                self._missing_key_logged = obj.metadata.resourceVersion
        self.resource_version = obj.metadata.resourceVersion if obj is not None else None
        if text == self.text:
            return None
        self.text = text
        return f"{self.ref}@{self.resource_version}" if obj is not None else f"{self.ref} deleted"

    def __repr__(self) -> str:
        return f"ConfigMapInput({str(self.ref)!r})"


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows symlinks, as a ConfigMap mount's key links need
    except OSError:
        return False


def _read_text(path: Path, name: str) -> str | None:
    try:
        return read_config_text(path)
    except UnicodeDecodeError as exc:
        raise _not_utf8(name, "<file>", name, exc) from None
    except OSError as exc:
        raise ConfigError(name, [Problem("<file>", name, f"cannot read: {exc.strerror or exc}")]) from None


def _not_utf8(source: str, key: str, value: str | None, exc: UnicodeDecodeError) -> ConfigError:
    return ConfigError(source, [Problem(key, value, f"not UTF-8 text ({exc.reason} at byte {exc.start})")])


def read_inputs(inputs: tuple[ConfigInput, ...] | list[ConfigInput]) -> tuple[list[ConfigText], list[ConfigError]]:
    """Every config text present in ``inputs``, each once (a file also found by a directory input
    is the same text), and the errors of texts that exist but could not be read."""
    seen: set[str] = set()
    texts: list[ConfigText] = []
    errors: list[ConfigError] = []
    for config_input in inputs:
        try:
            found = config_input.read()
        except ConfigError as exc:
            errors.append(exc)
            continue
        for text in found:
            key = text.key or text.name
            if key not in seen:
                seen.add(key)
                texts.append(text)
    return texts, errors


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """The merged config of every present text, and each text's warnings as ``(name, problem)``."""

    merged: MergedConfig
    warnings: tuple[tuple[str, Problem], ...] = ()

    @property
    def config(self) -> MasqConfig:
        return self.merged.config


class ConfigLoader:
    """Reads every input, parses each present text on its own and merges the results.

    A text that did not change since the last load is not parsed again: a resync of an
    unchanged 100k-CIDR file costs a string comparison, not a parse (benchmarks/RESULTS.md). A
    text that changed is parsed with the networks of its previous version at hand, so an edit of
    a few lines builds a few networks, and the old and new rules share the others.
    :meth:`load` raises :class:`ConfigError` listing the problems of every invalid or unreadable
    text; then nothing of the new state is used (the rules last applied stay).
    """

    def __init__(self, inputs: tuple[ConfigInput, ...] | list[ConfigInput], options: AgentOptions):
        self.inputs = tuple(inputs)
        self.options = options
        self._parsed: dict[str, tuple[str, ParsedConfig | ConfigError]] = {}  # name -> (text, result)
        self._files_present: dict[str, bool | None] = {}  # each file input's presence at the last load
        self._any_text = False  # whether any text was present at the last load

    @property
    def names(self) -> str:
        """The inputs, for log lines: ``/etc/config/ip-masq-agent, configmap kube-system/x``."""
        return ", ".join(config_input.name for config_input in self.inputs)

    def load(self) -> LoadedConfig:
        texts, errors = read_inputs(self.inputs)
        self._any_text = bool(texts)
        self._note_files()
        parts: list[tuple[str, MasqConfig]] = []
        warnings: list[tuple[str, Problem]] = []
        for text in texts:
            result = self._parse(text)
            if isinstance(result, ConfigError):
                errors.append(result)
            else:
                parts.append((text.name, result.config))
                warnings.extend((text.name, warning) for warning in result.warnings)
        for gone in self._parsed.keys() - {text.name for text in texts}:
            del self._parsed[gone]
        if errors:
            raise _combined(errors, warnings)
        return LoadedConfig(merge_configs(parts, self.options), tuple(warnings))

    def missing_files(self) -> list[tuple[str, str]]:
        """``(path, what that means)`` for each config file missing at the last :meth:`load`."""
        return [(config_input.name, missing_note(not self._any_text)) for config_input in self.inputs
                if isinstance(config_input, FileInput) and config_input.present is False]

    def missing_at_start(self) -> list[tuple[str, str]]:
        """:meth:`missing_files` before any load (the daemon says so at start-up, once)."""
        files = [config_input for config_input in self.inputs if isinstance(config_input, FileInput)]
        missing = [config_input.name for config_input in files if not os.path.exists(config_input.path)]
        return [(name, missing_note(len(missing) == len(self.inputs))) for name in missing]

    def _note_files(self) -> None:
        """Log a config file appearing or disappearing since the last load (a daemon loads again
        on every change; a one-shot command, once, says what is missing itself)."""
        for config_input in self.inputs:
            if not isinstance(config_input, FileInput):
                continue
            before = self._files_present.get(config_input.name)
            now = self._files_present[config_input.name] = config_input.present
            if before is None or now is None or before == now:
                continue
            if now:
                log.info("config file present now; its config applies", path=config_input.name)
            else:
                log.warning(f"config file gone: {missing_note(not self._any_text)}", path=config_input.name)

    def texts(self) -> dict[str, str]:
        """Every text present at the last :meth:`load`, by name (``masqd
        explain`` finds the line listing each CIDR in it; nothing is read again)."""
        return {name: text for name, (text, _) in self._parsed.items()}

    def _parse(self, text: ConfigText) -> ParsedConfig | ConfigError:
        cached = self._parsed.get(text.name)
        if cached is None or cached[0] != text.text:
            # an edited text: the lines that did not change keep their networks (see parse_config)
            known = cached[1].known_networks() if cached is not None and isinstance(cached[1], ParsedConfig) else None
            try:
                cached = (text.text, parse_config(text.text, self.options, source=text.name, known=known))
            except ConfigError as exc:
                cached = (text.text, exc)
            self._parsed[text.name] = cached
        result = cached[1]
        if isinstance(result, ConfigError):
            return result.with_traceback(None)  # a fresh traceback each time: no growth per resync
        return result


def _combined(errors: list[ConfigError], warnings: list[tuple[str, Problem]]) -> ConfigError:
    """One error for every invalid text: the error itself when there is one, else one error whose
    problems (and warnings) name their text."""
    if len(errors) == 1:
        return errors[0]
    problems = [Problem(f"{exc.source}: {p.key}", p.value, p.reason) for exc in errors for p in exc.problems]
    notes = [Problem(f"{exc.source}: {w.key}", w.value, w.reason) for exc in errors for w in exc.warnings]
    notes += [Problem(f"{name}: {w.key}", w.value, w.reason) for name, w in warnings]
    return ConfigError(", ".join(exc.source for exc in errors), problems, tuple(notes))


def missing_note(defaults: bool) -> str:
    """What a missing config file means: ``defaults`` when no config text is present at all."""
    return f"no such file; {'the defaults apply' if defaults else 'it contributes nothing'} ({MISSING_ALLOWED})"


def config_loader(config: str | os.PathLike[str] | ConfigLoader | Sequence[ConfigInput],
                  options: AgentOptions) -> ConfigLoader:
    """A loader for ``config``: a loader as it is, a path as one file input, or the inputs."""
    if isinstance(config, ConfigLoader):
        return config
    if isinstance(config, (str, os.PathLike)):
        return ConfigLoader([FileInput(config)], options)
    return ConfigLoader(list(config), options)


def config_inputs(paths: list[str] | tuple[str, ...], directories: list[str] | tuple[str, ...] = (),
                  kube: KubeSettings | None = None) -> list[ConfigInput]:
    """Every config input the flags name: files (``--config``, may repeat), directories
    (``--config-dir``), then the API ConfigMap (``--kube-configmap``)."""
    stdin = StdinInput() if STDIN in paths else None  # one input however often '-' is given: read once
    inputs: list[ConfigInput] = list(dict.fromkeys(stdin if path == STDIN else FileInput(path) for path in paths))
    inputs += map(DirectoryInput, directories)
    if kube is not None and kube.configmap is not None:
        inputs.append(ConfigMapInput(kube.configmap, kube))
    return inputs
