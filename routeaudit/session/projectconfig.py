"""``[tool.routeaudit]`` in pyproject.toml: a project's defaults for the command line.

Why it is built this way:

- One implementation of validation. Every key is an option of ``routeaudit run`` (or
  ``validate``), and its value goes through that option's own argparse ``type=`` callable and
  ``choices``: the file accepts exactly what the command line accepts, with the same
  messages. pydantic supplies the structure (unknown keys, sub-tables, every problem at
  once); the messages name the file, the table and the key, and are usage errors (exit 4).
- Keys are option dests (``alpha``, ``seeds``, ``gap_margin``, ``min_count``), except
  ``audits`` (``--audit``), ``summaries`` (``--summary``) and ``plugins`` (``-p``), which
  are lists. An option a plugin adds in an option group of its own
  (``parser.getgroup("causal_ablation")``) lives in the sub-table named after that group:
  ``[tool.routeaudit.causal_ablation] mass_min = 0.2``. Options plugins add to a core group
  (``reporting``: ``json``, ``html``) are top-level keys.
- The command line wins over the file, option by option; ``plugins`` is the exception: the
  file's plugins load first and ``-p`` adds to them (``-p no:NAME`` blocks one), as pytest's
  ``addopts`` and ``-p`` do. Relative ``.py`` plugin paths are relative to the file's
  directory; every other value means what it would on the command line. A list may stand
  for an option that takes a comma-separated list when its type says so
  (``fn.comma_list = True``, as ``--seeds`` does): ``seeds = [0, 1, 2]``.
- Discovery: ``--no-config`` reads nothing; ``--config FILE`` reads FILE (which must have a
  ``[tool.routeaudit]`` table); otherwise the nearest ``pyproject.toml`` from the working
  directory upward. The first one found ends the search whether or not it has the table, so
  a sub-project's ``pyproject.toml`` without one means "no configuration", never its
  parent's (pytest's rootdir search, in spirit).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic_core import PydanticCustomError

from routeaudit.errors import UsageError, show_path
from routeaudit.session.plugins import is_file_plugin

#: The section of pyproject.toml this module reads.
SECTION = "tool.routeaudit"
#: Where a value given on the command line came from (``Config.sources``).
COMMAND_LINE = "command line"
#: File keys whose name differs from the option's dest: list-valued options read as plurals.
KEY_OF_DEST = {"audit": "audits", "summary": "summaries"}
#: Dests that are never file keys: positionals, start-up switches, the config switches.
NOT_KEYS = frozenset({"help", "version", "targets", "command", "plugins", "no_entry_points",
                      "config_file", "no_config"})


# --------------------------------------------------------------------------- the file
@dataclass(frozen=True)
class ProjectFile:
    """The configuration file of a run (or none) and its ``[tool.routeaudit]`` table."""

    path: Path | None = None
    label: str = ""
    """How reports and messages name the file: its path relative to the working directory."""
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.label} [{SECTION}]"

    def plugins(self) -> list[str]:
        """The ``plugins`` list, checked, with relative ``.py`` paths made relative to the
        file's directory (the working directory may be a sub-directory)."""
        value = self.table.get("plugins", [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UsageError(f"{self.where}: plugins: expected an array of plugin module names "
                             f"or .py files, like [\"my_audits.py\"], not {_show(value)}")
        out = []
        for arg in value:
            if is_file_plugin(arg) and not arg.startswith("no:") and self.path is not None:
                path = Path(arg) if Path(arg).is_absolute() else self.path.parent / arg
                if not path.is_file():
                    raise UsageError(f"{self.where}: plugins: no such plugin file {arg!r} (paths "
                                     f"are relative to the directory of {self.label})")
                arg = str(path)
            out.append(arg)
        return out


def find_pyproject(start: Path) -> Path | None:
    """The nearest ``pyproject.toml`` in ``start`` or a directory above it."""
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_project_file(config_file: str | None = None, no_config: bool = False,
                      cwd: Path | None = None) -> ProjectFile:
    """The file a run reads: none (``--no-config``), ``--config FILE``, else the nearest
    ``pyproject.toml`` from ``cwd`` upward (an empty table when it has no section)."""
    if no_config:
        return ProjectFile()
    cwd = Path.cwd() if cwd is None else cwd
    if config_file is not None:
        path = cwd / config_file
        if not path.is_file():
            raise UsageError(f"--config {show_path(config_file)}: no such file")
    else:
        found = find_pyproject(cwd)
        if found is None:
            return ProjectFile()
        path = found
    label = _label(path, cwd)
    document = _read_toml(path, label)
    section: Any = document
    for part in SECTION.split("."):
        section = section.get(part) if isinstance(section, dict) else None
    if section is None:
        if config_file is not None:
            raise UsageError(f"--config {label}: the file has no [{SECTION}] table")
        return ProjectFile(path, label, {})
    if not isinstance(section, dict):
        raise UsageError(f"{label}: [{SECTION}] must be a table, not {_show(section)}")
    return ProjectFile(path, label, section)


def _label(path: Path, cwd: Path) -> str:
    try:
        return show_path(os.path.relpath(path, cwd))
    except ValueError:  # another drive (Windows)
        return show_path(path)


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise UsageError(f"{label}: reading it needs the tomli package on Python 3.10 "
                             "(pip install tomli), or run with --no-config") from exc
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"{label}: cannot read it: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{label}: not valid TOML: {exc}") from exc


# --------------------------------------------------------------------------- the keys
@dataclass(frozen=True)
class OptionKey:
    """One file key and the command-line option it stands for."""

    key: str
    action: argparse.Action
    table: str | None = None
    """None for a top-level key, else the sub-table (the plugin's option group)."""

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def where(self) -> str:
        return f"[{SECTION}]" if self.table is None else f"[{SECTION}.{self.table}]"


def group_titles(parser: argparse.ArgumentParser) -> set[str]:
    """The option groups a parser has now: taken before plugins add options, it tells a
    plugin's own group (a sub-table) from a core one (top-level keys)."""
    return {g.title for g in parser._action_groups if g.title}


def option_keys(parsers: Iterable[argparse.ArgumentParser], core_groups: set[str]) -> list[OptionKey]:
    """Every option of ``parsers`` that the file may set (the first parser defining a dest
    wins)."""
    keys: list[OptionKey] = []
    seen: set[str] = set()
    for parser in parsers:
        for group in parser._action_groups:
            for action in group._group_actions:
                if (not action.option_strings or action.dest in NOT_KEYS or action.dest in seen
                        or action.dest == argparse.SUPPRESS):
                    continue
                seen.add(action.dest)
                table = None if group.title in core_groups or not group.title else group.title
                keys.append(OptionKey(KEY_OF_DEST.get(action.dest, action.dest), action, table))
    top = {k.key for k in keys if k.table is None} | {"plugins"}
    # a plugin group named like a top-level key ("alpha") cannot be a sub-table: keep it flat
    return [OptionKey(k.key, k.action, None) if k.table in top else k for k in keys]


# --------------------------------------------------------------------------- values
class _Bad(ValueError):
    """A value the option refuses; the text is the whole reason."""


def _show(value: Any) -> str:
    """A TOML value as the user wrote it, roughly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (str, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _text(value: Any) -> str:
    """A scalar as the command line would have given it."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Bad(f"expected a number or a string, not {_show(value)}")


#: argparse's own conversion and choice check (``_get_value``, ``_check_value``), so a value
#: from the file fails with the very message the command line gives.
_ARGPARSE = argparse.ArgumentParser(add_help=False)


def _one(action: argparse.Action, value: Any) -> Any:
    """One value through the option's ``type=`` and ``choices``, by argparse itself."""
    if action.type is None and not isinstance(value, str):
        raise _Bad(f"expected a string, not {_show(value)}")
    try:
        result = _ARGPARSE._get_value(action, _text(value))
        _ARGPARSE._check_value(action, result)
    except argparse.ArgumentError as exc:
        raise _Bad(exc.message) from None
    return result


def _many(action: argparse.Action, value: Any) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    return [_one(action, item) for item in items]


def convert(action: argparse.Action, value: Any) -> Any:
    """A file value as the parsed option would hold it; raises ``_Bad`` with the reason."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise _Bad(f"expected true or false, not {_show(value)}")
        return value
    if isinstance(action, argparse._StoreConstAction) and not isinstance(
            action, argparse._AppendConstAction):
        if not isinstance(value, bool):
            raise _Bad(f"expected true or false, not {_show(value)}")
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Bad(f"expected a count (0, 1, 2, ...), not {_show(value)}")
        return value
    if isinstance(action, argparse._AppendAction) or (
            isinstance(action, argparse._StoreAction) and action.nargs in ("*", "+")):
        items = _many(action, value)
        if not items and action.nargs == "+":
            raise _Bad("expected at least one value")
        return items
    if isinstance(action, argparse._StoreAction) and isinstance(action.nargs, int):
        items = _many(action, value)
        if len(items) != action.nargs:
            raise _Bad(f"expected {action.nargs} values, got {len(items)}")
        return items
    if not isinstance(action, argparse._StoreAction):
        raise _Bad(f"option {'/'.join(action.option_strings)} cannot be set from a file")
    if isinstance(value, list):  # an option type that parses "0,1,2" says so: fn.comma_list = True
        if not getattr(action.type, "comma_list", False):
            raise _Bad(f"expected a single value, not {_show(value)}")
        value = ",".join(_text(v) for v in value)
    return _one(action, value)


def _validator(action: argparse.Action, value: Any) -> Any:
    try:
        return convert(action, value)
    except _Bad as exc:
        raise PydanticCustomError("routeaudit_option", "{reason}", {"reason": str(exc)}) from None


def _model(name: str, keys: list[OptionKey],
           tables: dict[str, type[pydantic.BaseModel]] | None = None) -> type[pydantic.BaseModel]:
    """A pydantic model of one table: a field per key (aliased: dests such as ``json`` would
    shadow BaseModel's attributes), one per sub-table, nothing else allowed."""
    fields: dict[str, Any] = {}
    for i, spec in enumerate(keys):
        fields[f"k{i}"] = (Annotated[Any, pydantic.BeforeValidator(partial(_validator, spec.action))],
                           pydantic.Field(default=None, alias=spec.key))
    for j, (title, model) in enumerate((tables or {}).items()):
        fields[f"t{j}"] = (model | None, pydantic.Field(default=None, alias=title))
    return pydantic.create_model(name, __config__=pydantic.ConfigDict(extra="forbid"), **fields)


def resolve(project: ProjectFile, keys: list[OptionKey],
            ignore_table: Callable[[str], bool] = lambda name: False) -> dict[str, Any]:
    """dest → value for every option the file sets, checked as the command line checks it.

    ``ignore_table(name)`` is true for sub-tables of plugins that are blocked this run
    (``-p no:causal_ablation``): their options do not exist, and that is no mistake.
    Raises one UsageError listing every problem, each naming the file, table and key.
    """
    if not project.table:
        return {}
    top = [k for k in keys if k.table is None]
    by_table: dict[str, list[OptionKey]] = {}
    for k in keys:
        if k.table is not None:
            by_table.setdefault(k.table, []).append(k)
    known_tables = {title: _model(f"table_{i}", specs)
                    for i, (title, specs) in enumerate(by_table.items())}
    plugins_key = OptionKey("plugins", argparse._AppendAction(["-p"], "plugins"))
    model = _model("routeaudit_table", [*top, plugins_key], known_tables)
    table = {k: v for k, v in project.table.items()
             if not (isinstance(v, dict) and k not in known_tables and ignore_table(k))}
    try:
        parsed = model.model_validate(table)
    except pydantic.ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: _position(project.table, e["loc"]))
        raise UsageError("\n".join(_message(project, e, keys, by_table) for e in errors)) from None
    values: dict[str, Any] = {}
    for i, spec in enumerate(top):
        if spec.key in table:
            values[spec.dest] = getattr(parsed, f"k{i}")
    for j, (title, specs) in enumerate(by_table.items()):
        sub = getattr(parsed, f"t{j}")
        if sub is None:
            continue
        for i, spec in enumerate(specs):
            if spec.key in table[title]:
                values[spec.dest] = getattr(sub, f"k{i}")
    return values


def _position(table: dict[str, Any], loc: tuple[Any, ...]) -> tuple[int, ...]:
    """Where a problem sits in the file (keys in the order written), to report in that order."""
    out = []
    for part in loc:
        keys = list(table) if isinstance(table, dict) else []
        out.append(keys.index(part) if part in keys else len(keys))
        table = table.get(part) if isinstance(table, dict) else None  # type: ignore[assignment]
    return tuple(out)


def _message(project: ProjectFile, error: Any, keys: list[OptionKey],
             by_table: dict[str, list[OptionKey]]) -> str:
    """One line per problem: ``FILE [tool.routeaudit(.TABLE)]: KEY: what is wrong``."""
    loc = [str(part) for part in error["loc"]]
    table = loc[0] if len(loc) > 1 else None
    key = loc[-1] if loc else "?"
    where = f"{project.label} [{SECTION}{'.' + table if table else ''}]"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: {_unknown(key, table, isinstance(error['input'], dict), keys, by_table)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: {key}: must be a table ([{SECTION}.{key}]), not {_show(error['input'])}"
    return f"{where}: {key}: {error['msg']}"


def _unknown(key: str, table: str | None, is_table: bool, keys: list[OptionKey],
             by_table: dict[str, list[OptionKey]]) -> str:
    """Why ``key`` is unknown, with the likeliest key it was meant to be."""
    here = [k.key for k in keys if k.table == table] + ([] if table else ["plugins"])
    what = "table" if table is None and is_table else "key"
    text = f"unknown {what} {key!r}"
    elsewhere = [k for k in keys if k.key == key and k.table != table]
    if elsewhere:
        return f"{text}: it belongs in {elsewhere[0].where}"
    normal = key.replace("-", "_").lstrip("_")
    if normal in here:
        return f"{text} (did you mean {normal!r}?)"
    plural = KEY_OF_DEST.get(key)
    if plural and plural in here:
        return f"{text} (did you mean {plural!r}?)"
    candidates = here + (list(by_table) if table is None else [])
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"{text} (did you mean {close[0]!r}?)"
    if what == "table":
        tables = ", ".join(sorted(by_table)) or "none"
        return f"{text}: no loaded plugin adds options in a group {key!r} (sub-tables: {tables})"
    return f"{text}; known keys: {', '.join(sorted(here))}"


# --------------------------------------------------------------------------- provenance
def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out.extend(_parsers(sub))
    return out


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests ``argv`` sets itself: ``argv`` parsed again with every default suppressed
    (robust to abbreviations, ``--opt=value`` and ``-kEXPR``, unlike matching the words)."""
    saved = [(p, dict(p._defaults), [(a, a.default) for a in p._actions]) for p in _parsers(parser)]
    for p, _, actions in saved:
        p._defaults.clear()
        for action, _ in actions:
            action.default = argparse.SUPPRESS
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            namespace, _ = parser.parse_known_args(argv)
    except SystemExit:  # cannot happen for an argv that parsed before; be safe
        return set()
    finally:
        for p, defaults, actions in saved:
            p._defaults.update(defaults)
            for action, default in actions:
                action.default = default
    return set(vars(namespace))


def apply(options: argparse.Namespace, values: dict[str, Any], explicit: set[str],
          project: ProjectFile, applicable: set[str] | None = None) -> dict[str, str]:
    """Set the file's values the command line left alone (only ``applicable`` dests, when
    given); the sources of every value not a default (``Config.sources``)."""
    sources = {dest: COMMAND_LINE for dest in explicit}
    for dest, value in values.items():
        if dest in explicit or (applicable is not None and dest not in applicable):
            continue
        setattr(options, dest, value)
        sources[dest] = project.label
    return sources


def dests_of(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}
