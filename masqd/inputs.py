"""Config inputs: where config text comes from.

An input holds zero or more config *sources* at any moment: a file (present or missing), a
directory of ``ip-masq*`` files (each one a source, as Azure's fork reads a user-owned and a
provider-owned ConfigMap side by side), or a ConfigMap read through the Kubernetes API
(:class:`masqd.sources.kube.ConfigMapInput`). The reconciler reads every input on each pass,
parses each source on its own and merges them (:func:`masqd.config.merge_configs`); a source that
is absent contributes nothing, and only when no source is present do the defaults apply.

Each input also names the event source that watches it (``watcher()``), which the built-in
sources plugin registers, so a change to any input reaches the reconciler at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from masqd.config import AgentOptions, MasqConfig, MergedConfig, ParsedConfig, merge_configs, parse_config
from masqd.errors import ConfigError, Problem
from masqd.sources.files import ConfigDirectorySource, ConfigFileSource, read_config_text

#: A file in a config directory is a config source when its name starts with this (Azure's
#: ip-masq-agent-v2 convention: ``ip-masq-agent``, ``ip-masq-agent-reconciled``, ...).
DIRECTORY_PREFIX = "ip-masq"


@dataclass(frozen=True, slots=True)
class SourceText:
    """One present config source: its name (a path, ``configmap NAMESPACE/NAME``) and its text.
    ``key`` identifies it when two inputs can hold the same source (a file's absolute path)."""

    name: str
    text: str
    key: str = ""


class ConfigInput(Protocol):
    """Something holding config sources. ``read()`` returns the sources present now (reading
    files is the only I/O allowed: it runs on every reconcile) and raises :class:`ConfigError`
    when a source exists but cannot be read."""

    name: str

    def read(self) -> list[SourceText]: ...

    def watcher(self) -> object | None: ...


class FileInput:
    """One config file (``--config``): a source when the file exists."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.name = str(path)

    def read(self) -> list[SourceText]:
        text = _read_text(self.path, self.name)
        return [] if text is None else [SourceText(self.name, text, os.path.abspath(self.path))]

    def watcher(self) -> ConfigFileSource:
        return ConfigFileSource(self.path)

    def __repr__(self) -> str:
        return f"FileInput({self.name!r})"


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

    def read(self) -> list[SourceText]:
        found = []
        for path in self.files():
            text = _read_text(path, str(path))
            if text is not None:  # removed between listing and reading
                found.append(SourceText(str(path), text, os.path.abspath(path)))
        return found

    def watcher(self) -> ConfigDirectorySource:
        return ConfigDirectorySource(self.path, self.files)

    def __repr__(self) -> str:
        return f"DirectoryInput({self.name!r})"


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows symlinks, as a ConfigMap mount's key links need
    except OSError:
        return False


def _read_text(path: Path, name: str) -> str | None:
    try:
        return read_config_text(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(name, [Problem("<file>", name, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:
        raise ConfigError(name, [Problem("<file>", name, f"cannot read: {exc.strerror or exc}")]) from None


def read_inputs(inputs: tuple[ConfigInput, ...] | list[ConfigInput]) -> tuple[list[SourceText], list[ConfigError]]:
    """Every source present in ``inputs``, each once (a file also found by a directory input is
    the same source), and the errors of sources that exist but could not be read."""
    seen: set[str] = set()
    texts: list[SourceText] = []
    errors: list[ConfigError] = []
    for config_input in inputs:
        try:
            found = config_input.read()
        except ConfigError as exc:
            errors.append(exc)
            continue
        for source in found:
            key = source.key or source.name
            if key not in seen:
                seen.add(key)
                texts.append(source)
    return texts, errors


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """The merged config of every present source, and each source's warnings as ``(name, problem)``."""

    merged: MergedConfig
    warnings: tuple[tuple[str, Problem], ...] = ()

    @property
    def config(self) -> MasqConfig:
        return self.merged.config


class ConfigLoader:
    """Reads every input, parses each present source on its own and merges the results.

    A source whose text did not change since the last load is not parsed again: a resync of an
    unchanged 100k-CIDR file costs a string comparison, not 0.7 s of parsing. :meth:`load`
    raises :class:`ConfigError` listing the problems of every invalid or unreadable source; then
    nothing of the new state is used (the rules last applied stay).
    """

    def __init__(self, inputs: tuple[ConfigInput, ...] | list[ConfigInput], options: AgentOptions):
        self.inputs = tuple(inputs)
        self.options = options
        self._parsed: dict[str, tuple[str, ParsedConfig | ConfigError]] = {}  # name -> (text, result)

    @property
    def names(self) -> str:
        """The inputs, for log lines: ``/etc/config/ip-masq-agent, configmap kube-system/x``."""
        return ", ".join(config_input.name for config_input in self.inputs)

    def load(self) -> LoadedConfig:
        texts, errors = read_inputs(self.inputs)
        parts: list[tuple[str, MasqConfig]] = []
        warnings: list[tuple[str, Problem]] = []
        for source in texts:
            result = self._parse(source)
            if isinstance(result, ConfigError):
                errors.append(result)
            else:
                parts.append((source.name, result.config))
                warnings.extend((source.name, warning) for warning in result.warnings)
        for gone in self._parsed.keys() - {source.name for source in texts}:
            del self._parsed[gone]
        if errors:
            raise _combined(errors, warnings)
        return LoadedConfig(merge_configs(parts, self.options), tuple(warnings))

    def texts(self) -> dict[str, str]:
        """The text of every source present at the last :meth:`load`, by source name (``masqd
        explain`` finds the line listing each CIDR in it; nothing is read again)."""
        return {name: text for name, (text, _) in self._parsed.items()}

    def _parse(self, source: SourceText) -> ParsedConfig | ConfigError:
        cached = self._parsed.get(source.name)
        if cached is None or cached[0] != source.text:
            try:
                cached = (source.text, parse_config(source.text, self.options, source=source.name))
            except ConfigError as exc:
                cached = (source.text, exc)
            self._parsed[source.name] = cached
        result = cached[1]
        if isinstance(result, ConfigError):
            return result.with_traceback(None)  # a fresh traceback each time: no growth per resync
        return result


def _combined(errors: list[ConfigError], warnings: list[tuple[str, Problem]]) -> ConfigError:
    """One error for every invalid source: the error itself when there is one, else one error whose
    problems (and warnings) name their source."""
    if len(errors) == 1:
        return errors[0]
    problems = [Problem(f"{exc.source}: {p.key}", p.value, p.reason) for exc in errors for p in exc.problems]
    notes = [Problem(f"{exc.source}: {w.key}", w.value, w.reason) for exc in errors for w in exc.warnings]
    notes += [Problem(f"{name}: {w.key}", w.value, w.reason) for name, w in warnings]
    return ConfigError(", ".join(exc.source for exc in errors), problems, tuple(notes))


def config_inputs(paths: list[str] | tuple[str, ...], directories: list[str] | tuple[str, ...] = ()) -> list[ConfigInput]:
    """The file and directory inputs for ``--config`` (may repeat) and ``--config-dir``."""
    return [*map(FileInput, paths), *map(DirectoryInput, directories)]
