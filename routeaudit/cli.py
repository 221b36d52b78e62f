"""Command line: argument parsing only; the work happens in routeaudit.session and .model.

The core parser knows the options every run has (targets, selection, statistics,
extraction, verbosity); each built-in audit and reporter adds its own through
``routeaudit_addoption``, as pytest plugins do; ``[tool.routeaudit]`` in pyproject.toml
gives any of them a project default (routeaudit.session.projectconfig). Exit codes are
pytest's (``ExitCode``); no input ends in a traceback: a user's mistake is exit 4 with one
message, a plugin that raises is an ``error`` row (exit 1), and a closed output pipe ends
quietly.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import routeaudit.optiontypes as optiontypes
from routeaudit._version import __version__
from routeaudit.errors import RouteAuditError, TraceValidationError, UsageError
from routeaudit.verdict import ExitCode


class Parser(argparse.ArgumentParser):
    """argparse with pytest's ``getgroup``: options of one plugin share one help section."""

    def getgroup(self, title: str, description: str | None = None) -> argparse._ArgumentGroup:
        """The option group called ``title``, created on first use."""
        for group in self._action_groups:
            if group.title == title:
                return group
        return self.add_argument_group(title, description)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, not {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("needs at least one seed")
    return seeds


_seeds.comma_list = True  # type: ignore[attr-defined]  # pyproject.toml may say seeds = [0, 1, 2]


#: Replicates per planted size of ``validate --quick`` (routeaudit.session.validate.QUICK).
QUICK_REPLICATES = 25


def add_run_options(parser: Parser, *, early: bool = False) -> None:
    """The core options of ``routeaudit run`` (plugins add theirs with ``getgroup``)."""
    parser.add_argument("targets", nargs="*" if early else "+", metavar="TARGET",
                        help="adapter .py file, trace directory or .npz file")
    sel = parser.getgroup("selection")
    sel.add_argument("-k", dest="keyword", metavar="EXPR",
                     help="only cells whose node id matches EXPR (substrings, and/or/not)")
    sel.add_argument("--audit", action="append", metavar="NAME", help="run only this audit (repeatable)")
    sel.add_argument("--summary", action="append", metavar="NAME",
                     help="routing summary to claim about (repeatable; default: all built-in)")
    st = parser.getgroup("statistics")
    st.add_argument("--seeds", type=_seeds, default=[0, 1, 2], metavar="0,1,2",
                    help="seeds; each redraws the 50/50 calibration/evaluation split (default 0,1,2)")
    st.add_argument("--alpha", type=optiontypes.probability, default=0.05, help="significance level (0.05)")
    st.add_argument("--permutations", type=optiontypes.positive_int, default=999,
                    help="permutations per test (999)")
    st.add_argument("--sequential-h", type=optiontypes.stop_after, default=20, metavar="H",
                    help="Besag-Clifford early stop of the permutation test after H "
                         "exceedances (20; 0 draws every permutation)")
    st.add_argument("--bootstrap", type=optiontypes.positive_int, default=1000,
                    help="bootstrap replicates (1000)")
    st.add_argument("--bins", type=optiontypes.positive_int, default=15, help="confidence bins (15)")
    st.add_argument("--bin-strategy", choices=["equal_mass", "equal_width"], default="equal_mass",
                    help="confidence bins for matching (equal_mass)")
    st.add_argument("--strata", choices=["within_bin", "global"], default="within_bin",
                    help="routing tertiles inside each confidence bin (default) or overall")
    st.add_argument("--min-count", type=optiontypes.positive_int, default=5,
                    help="least examples in a (bin, stratum) cell for it to count (5)")
    st.add_argument("--stability", choices=["all", "majority"], default="all",
                    help="a claim must hold in all seeds (default) or a majority")
    st.add_argument("--inconclusive", choices=["fail", "warn"], default="fail",
                    help="whether an inconclusive verdict fails the run (fail)")
    st.add_argument("--tv-min", type=optiontypes.non_negative, default=1e-4, metavar="TV",
                    help="routing whose largest per-layer TV distance from the mean routing is "
                         "below TV is content-independent (1e-4; 0 turns the check off)")
    st.add_argument("--gap-margin", type=optiontypes.non_negative, default=0.01, metavar="M",
                    help="an excess matched-confidence gap shown below M refutes the "
                         "routing-signal claim (0.01)")
    cal = parser.getgroup("calibrator audits")
    cal.add_argument("--calibrator", metavar="module:factory",
                     help="calibrator factory to audit (a registered name or module:factory)")
    cal.add_argument("--tertile-summary", metavar="NAME", default=None,
                     help="routing summary whose tertiles define worst-tertile ECE (default: the "
                          "calibrator's first scalar routing feature, else r_agg)")
    cal.add_argument("--gain-margin", type=optiontypes.non_negative, default=0.005, metavar="M",
                     help="a gain in worst-tertile ECE shown below M refutes the claim (0.005)")
    ext = parser.getgroup("extraction")
    ext.add_argument("--device", default=None,
                     help="torch device (default: cuda if present, else cpu)")
    add_extraction_options(ext)
    out = parser.getgroup("reporting")
    out.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    out.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    add_config_options(parser)


def add_config_options(parser: Any) -> None:
    """``--config FILE`` / ``--no-config`` (routeaudit.session.projectconfig), on every
    command: the file's ``plugins`` count for listing audits and summaries too."""
    group = parser.getgroup("configuration") if isinstance(parser, Parser) else parser
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                        help="read [tool.routeaudit] from FILE (default: the nearest "
                             "pyproject.toml from the working directory upward)")
    choice.add_argument("--no-config", action="store_true",
                        help="ignore [tool.routeaudit] in pyproject.toml")


def add_extraction_options(parser: Any) -> None:
    """Stage A options shared by ``run`` and ``extract`` (see routeaudit.model.extract)."""
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="trace cache directory (default: $ROUTEAUDIT_CACHE_DIR, "
                             "else ./.routeaudit_cache)")
    parser.add_argument("--no-cache", action="store_true",
                        help="always run the model; neither read nor write the trace cache")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none",
                        help="run the model under bf16 autocast (default none)")


def build_parser(*, early: bool = False) -> Parser:
    """The command line. ``early=True`` builds the lenient pre-parser that only finds the
    command, the targets and ``--no-entry-points`` before plugins are loaded (no help, no
    required arguments), so that ``run --help`` can list the options plugins add."""
    parser = Parser(
        prog="routeaudit", add_help=not early,
        description="Audit routing-aware calibration and interpretability claims.")
    parser.add_argument("--version", action="version", version=f"routeaudit {__version__}")
    parser.add_argument("-p", dest="plugins", action="append", default=[], metavar="PLUGIN",
                        help="load plugin PLUGIN (a module name or a .py file), or block one "
                             "with no:NAME (repeatable)")
    parser.add_argument("--no-entry-points", action="store_true",
                        help="do not autoload plugins from installed packages")
    sub = parser.add_subparsers(dest="command", required=not early, parser_class=Parser)
    add_run_options(sub.add_parser("run", help="run the audit battery on targets",
                                   add_help=not early), early=early)
    val = sub.add_parser("validate", add_help=not early,
                         help="simulate the audits' error rates at a target's N, seeds and margins")
    add_run_options(val, early=early)
    val.add_argument("--quick", action="store_true",
                     help=f"{QUICK_REPLICATES} replicates per size, fewer permutations and "
                          "bootstrap replicates, no calibrator audits (about a minute)")
    val.add_argument("--replicates", type=optiontypes.positive_int, default=None, metavar="R",
                     help=f"replicates per planted size (default 100; {QUICK_REPLICATES} with --quick)")
    lst = sub.add_parser("audits", help="list the audits that plugins provide", add_help=not early)
    lst.add_argument("targets", nargs="*", metavar="TARGET", help="adapter files whose plugins count")
    add_config_options(lst)
    sm = sub.add_parser("summaries", add_help=not early,
                        help="list the routing summaries: built-in and those plugins register")
    sm.add_argument("targets", nargs="*", metavar="TARGET", help="adapter files whose plugins count")
    add_config_options(sm)
    ext = sub.add_parser("extract", help="extract traces from an adapter and store them",
                         add_help=not early)
    ext.add_argument("targets", nargs="*" if early else 1, metavar="ADAPTER")
    ext.add_argument("-o", "--output", required=not early, help="trace directory to write")
    ext.add_argument("--force", action="store_true",
                     help="replace OUTPUT if it is a trace directory routeaudit wrote before "
                          "(anything else is never deleted or overwritten)")
    ext.add_argument("--device", default=None)
    add_extraction_options(ext)
    ext.add_argument("-q", "--quiet", action="count", default=0)
    ext.add_argument("-v", "--verbose", action="count", default=0,
                     help="say what changed when the trace cache misses")
    add_config_options(ext)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(_main(argv))
    except KeyboardInterrupt:
        print("routeaudit: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:  # the reader went away (e.g. `routeaudit audits | head`)
        from routeaudit.report.terminal import silence_stdout

        silence_stdout()
        return int(ExitCode.OK)
    except TraceValidationError as exc:
        say(f"routeaudit: invalid traces: {exc}")
        return int(ExitCode.USAGE_ERROR)
    except RouteAuditError as exc:
        say(f"routeaudit: error: {exc}")
        return int(ExitCode.USAGE_ERROR)
    except SystemExit as exc:  # argparse
        return int(exc.code) if isinstance(exc.code, int) and exc.code != 2 else int(
            ExitCode.USAGE_ERROR if exc.code else ExitCode.OK)
    except Exception:
        traceback.print_exc()
        print("routeaudit: internal error (please report it)", file=sys.stderr)
        return int(ExitCode.INTERNAL_ERROR)


def say(text: str) -> None:
    """A message on stderr that cannot fail: a file name that is not UTF-8 (a lone
    surrogate) is shown escaped instead of raising UnicodeEncodeError."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), file=sys.stderr)


def split_plugin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull every ``-p NAME`` / ``-pNAME`` out of argv, wherever it stands (as pytest does).

    Plugins must be known before the command line is parsed, because they add options.
    """
    plugins: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest.append(arg)
            rest.extend(it)
            break
        if arg == "-p":
            value = next(it, None)
            if value is None:
                raise UsageError("-p needs a plugin module name, a .py file, or no:NAME")
            plugins.append(value)
        elif arg.startswith("-p") and len(arg) > 2:
            plugins.append(arg[2:])
        else:
            rest.append(arg)
    return plugins, rest


@dataclass
class Startup:
    """What every command starts from: plugins loaded, options parsed, the session config."""

    options: argparse.Namespace
    config: Any
    modules: dict[str, Any]
    caller: Any


def start(plugin_args: list[str], argv: list[str]) -> Startup:
    """Read ``[tool.routeaudit]`` (routeaudit.session.projectconfig), load plugins (the
    file's, ``-p``, entry points, the targets' own .py files), let them add options, parse
    ``argv``, then fill in what the command line left alone from the file. argparse's usage
    errors exit (SystemExit) as argparse does; the file's are UsageErrors naming the key."""
    from routeaudit.session import projectconfig
    from routeaudit.session.calls import HookCaller, PluginFailure
    from routeaudit.session.config import Config
    from routeaudit.session.plugins import load_plugins
    from routeaudit.summaries import default_registry

    parser = build_parser()
    early, _ = build_parser(early=True).parse_known_args(argv)
    project = projectconfig.load_project_file(getattr(early, "config_file", None),
                                              getattr(early, "no_config", False))
    file_plugins = project.plugins()
    failures: list[PluginFailure] = []
    pm, modules = load_plugins([*file_plugins, *plugin_args], getattr(early, "targets", []) or [],
                               load_entry_points=not early.no_entry_points, failures=failures)
    caller = HookCaller(pm, failures, reraise=(RouteAuditError,))
    run_parser = _subparser(parser, "run")
    core_groups = projectconfig.group_titles(run_parser)
    caller.call("routeaudit_addoption", parser=run_parser)
    options = parser.parse_args(argv)
    keys = projectconfig.option_keys([run_parser, _subparser(parser, "validate")], core_groups)
    values = projectconfig.resolve(project, keys, ignore_table=pm.is_blocked)
    explicit = projectconfig.explicit_dests(parser, argv)
    command = _subparser(parser, options.command)
    applicable = None if options.command in ("run", "validate") else projectconfig.dests_of(command)
    sources = projectconfig.apply(options, values, explicit, project, applicable)
    options.plugins = [*file_plugins, *plugin_args]
    if options.plugins:
        sources["plugins"] = " and ".join(
            name for name, given in ((project.label, file_plugins), ("command line", plugin_args))
            if given)
    options.config_file = project.label or None
    config = Config(options=options, pluginmanager=pm, summaries=default_registry(),
                    failures=failures, sources=sources)
    return Startup(options=options, config=config, modules=modules, caller=caller)


def finish(config: Any, exit_code: int) -> list[Any]:
    """Call ``routeaudit_sessionfinish``; the plugins that raised in it."""
    from routeaudit.session.calls import HookCaller, PluginFailure

    failed: list[PluginFailure] = []
    HookCaller(config.pluginmanager, failed).call("routeaudit_sessionfinish", config=config,
                                                   exitstatus=exit_code)
    return failed


def _main(argv: list[str]) -> int:
    parser = build_parser()
    plugin_args, argv = split_plugin_args(argv)
    if not argv:
        parser.print_help()
        return int(ExitCode.USAGE_ERROR)
    early, _ = build_parser(early=True).parse_known_args(argv)
    if early.command is None:  # `routeaudit --help`, `--version` or a usage error: no plugins
        parser.parse_args(argv)
        return int(ExitCode.USAGE_ERROR)
    started = start(plugin_args, argv)
    options, config, modules, caller = (started.options, started.config, started.modules,
                                        started.caller)
    if options.command == "audits":
        return _list_audits(config)
    if options.command == "summaries":
        return _list_summaries(config, caller)
    if options.command == "extract":
        return _extract(options, modules)
    caller.call("routeaudit_configure", config=config)
    if options.command == "validate":
        from routeaudit.session.validate import run_validation

        return run_validation(config, options.targets, modules)
    from routeaudit.session.runner import run_session

    report = run_session(config, options.targets, modules)
    finished = finish(config, report.exit_code)
    for failure in finished:  # the reports are written: say it here, and fail the run
        print(f"routeaudit: plugin {failure.plugin!r}: {failure.verdict().reason}\n"
              f"{failure.call.traceback}", file=sys.stderr)
    if finished and report.exit_code == ExitCode.OK:
        return int(ExitCode.VERDICT_FAILED)
    return report.exit_code


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of command ``name``."""
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise RuntimeError("no subparsers")


def _list_audits(config: Any) -> int:
    from routeaudit.session.runner import collect_audits

    config.options.audit = None
    audits = collect_audits(config)
    pm = config.pluginmanager
    lines = []
    for audit in audits:
        needs = ", ".join(sorted(audit.needs))
        plugin = pm.get_name(pm.get_plugin(type(audit).__module__) or audit) \
            or type(audit).__module__
        lines.append(f"{audit.name}  [{needs}]  ({plugin})\n    {audit.claim}")
    for failure in config.failures:
        lines.append(f"{failure.plugin}  [error]\n    {failure.verdict().reason}")
    print("\n".join(lines))
    if config.failures:
        return int(ExitCode.VERDICT_FAILED)
    return int(ExitCode.OK if audits else ExitCode.NO_AUDITS)


#: How ``routeaudit summaries`` names what a summary's sources must be.
_APPLIES = {"any": "any sources", "depth": "depth sources only", "experts": "experts only"}


def _list_summaries(config: Any, caller: Any) -> int:
    """Every routing summary this run knows, as ``pytest --markers`` lists markers: name, what
    it is (a scalar, a per-layer profile or a label), which sources it applies to, whether
    it is a default claim, and its definition."""
    import textwrap

    from routeaudit.summaries import default_registry

    caller.call("routeaudit_register_summaries", registry=config.summaries)
    builtin = {s.name for s in default_registry()}
    default_claims = set(config.summaries.default_cells())
    lines = []
    for s in config.summaries:
        form = "label" if s.categorical else ("profile (one value per layer)" if s.shape == "profile"
                                              else "scalar")
        traits = [f"{s.kind} {form}", _APPLIES.get(s.applies_to, s.applies_to)]
        if s.name in default_claims:
            traits.append("default claim")
        origin = "" if s.name in builtin else "  (plugin)"
        definition = " ".join(s.description.split()) or "(no definition given)"
        lines.append(f"{s.name}  [{', '.join(traits)}]{origin}")
        lines.append(textwrap.fill(definition, 96, initial_indent="    ", subsequent_indent="    "))
    lines.append("H<l>, H<l>_norm  [routing scalar, any sources]")
    lines.append(textwrap.fill("routing entropy of one routing layer l (numbered from 0; _norm "
                               "divides by log n_l), e.g. H0, H3_norm", 96,
                               initial_indent="    ", subsequent_indent="    "))
    for failure in config.failures:
        lines.append(f"{failure.plugin}  [error]\n    {failure.verdict().reason}")
    print("\n".join(lines))
    return int(ExitCode.VERDICT_FAILED if config.failures else ExitCode.OK)


def _extract(options: argparse.Namespace, modules: dict[str, Any]) -> int:
    from routeaudit.errors import AdapterError
    from routeaudit.model.adapter import find_adapters
    from routeaudit.model.extract import traces_from_adapter

    target = options.targets[0]
    if target not in modules:
        raise AdapterError(f"{target}: extract needs an adapter .py file")
    adapters = find_adapters(modules[target])
    if len(adapters) != 1:
        raise AdapterError(f"{target}: expected exactly one @routeaudit.adapter, found {len(adapters)}")
    from routeaudit.model.shards import distributed_env, extract_sharded
    from routeaudit.session.targets import say_cache

    env = distributed_env()
    if env is not None:  # under torchrun: this rank extracts its share; rank 0 joins them
        joined = extract_sharded(adapters[0], options.output, env=env, force=options.force,
                                 device=options.device, progress=not options.quiet,
                                 autocast=options.autocast, cache=not options.no_cache,
                                 cache_dir=options.cache_dir)
        if joined is not None:
            print(f"wrote {joined!r} to {options.output} ({env.world_size} shards; the trace "
                  "cache is not used by sharded extraction)")
        return int(ExitCode.OK)
    traces = traces_from_adapter(adapters[0], device=options.device, progress=not options.quiet,
                                 autocast=options.autocast, cache=not options.no_cache,
                                 cache_dir=options.cache_dir,
                                 on_session=lambda s: say_cache(target, s, options))
    out = Path(options.output)
    if len(traces) == 1:
        traces[0].save(out, force=options.force)
        print(f"wrote {traces[0]!r} to {out}")
    else:
        for i, ts in enumerate(traces):
            ts.save(out / f"replicate-{i}", force=options.force)
        print(f"wrote {len(traces)} replicates to {out}")
    return int(ExitCode.OK)
