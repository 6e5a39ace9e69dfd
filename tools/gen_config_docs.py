"""Generate docs/configuration.md from the option declarations.

The manager's and the tiers' options come from their declarations in
``src/mtckpt/config.py`` (``ManagerOptions`` and the tier dataclasses: each field's type,
default and meaning, :mod:`mtckpt.options`), the daemon's from ``DaemonConfig`` there
(which also makes the flags of ``mtckpt daemon``). An option without a meaning stops the
generator.

    python tools/gen_config_docs.py           # rewrite docs/configuration.md
    python tools/gen_config_docs.py --check   # exit 1 if docs/configuration.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"

TIER_HELP = {
    "memory": "`mtckpt.MemoryTier`: node memory. Always present (a default one if not given).",
    "local": "`mtckpt.LocalTier`: node-local disk.",
    "peers": "`mtckpt.PeerTier`: copies on other nodes, made by this node's daemon.",
    "remote": "`mtckpt.ObjectTier`: object storage.",
}

# Operator command-line flags (`mtckpt ls`, `inspect`, `verify`, `restore`, `gc`, `export`)
# that stand for a library option.
SELECTION_FLAGS = {
    ("", "run"): "--run",
    ("memory", "path"): "--memory",
    ("local", "path"): "--local",
    ("remote", "url"): "--remote",
}

# Daemon defaults that are not a DaemonConfig default.
DAEMON_DEFAULTS = {
    "node_id": "the host name",
    "memory_root": "the file's `[memory] path`; required",
    "local_root": "the file's `[local] path`, else none",
    "remote": "the file's `[remote] url`, else none",
}


def _format_default(value: object) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value}` ({value >> 20} MiB)"
    return f"`{value}`"


def _kind(kind: type, optional: bool) -> str:
    name = {dict: "table", list: "list of `HOST:PORT`", float: "float", str: "str"}.get(
        kind, kind.__name__
    )
    return f"{name} or none" if optional else name


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _subparser(top: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise SystemExit("mtckpt.cli.parser() has no sub-commands")


def _flags(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest != "help"}


def _help_of(field: dataclasses.Field, where: str) -> str:
    from mtckpt import options

    text = options.help_of(field)
    if not text:
        raise SystemExit(f"tools/gen_config_docs.py: option {where} has no meaning: add help=")
    return text


def _selection_note(tier: str, name: str, selection: dict[str, argparse.Action]) -> str:
    flag = SELECTION_FLAGS.get((tier, name))
    if flag is None:
        return ""
    (action,) = [a for a in selection.values() if flag in a.option_strings]
    metavar = f" {action.metavar}" if action.metavar else ""
    return f" Command line: `{flag}{metavar}`."


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return _format_default(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return _format_default(field.default_factory())
    return "required"


def manager_section(selection: dict[str, argparse.Action]) -> list[str]:
    from mtckpt import config, options

    kinds = options.kinds(config.ManagerOptions)
    lines = [
        "## Manager options",
        "",
        "Keyword arguments of `mtckpt.CheckpointManager` (`run` may be given by position), "
        "top-level keys of the TOML file, and `MTCKPT_` + the name in upper case.",
        "",
        _row("option", "type", "default", "environment", "meaning"),
        "|---|---|---|---|---|",
    ]
    for field in dataclasses.fields(config.ManagerOptions):
        kind = kinds[field.name]
        lines.append(_row(
            f"`{field.name}`", _kind(kind.base, kind.optional), _default(field),
            f"`MTCKPT_{field.name.upper()}`",
            _help_of(field, field.name) + _selection_note("", field.name, selection),
        ))  # fmt: skip
    return lines


def tier_sections(selection: dict[str, argparse.Action]) -> list[str]:
    from mtckpt import config, options

    lines = [
        "## Tier options",
        "",
        "Each tier is a frozen dataclass passed to the manager (`memory=`, `local=`, `peers=`, "
        "`remote=`), a table of the TOML file (`[memory]`, `[local]`, `[peers]`, "
        "`[remote]`), and `MTCKPT_` + the table + `_` + the field in upper case.",
    ]
    for tier, cls in config.TIER_CLASSES.items():
        lines += [
            "",
            f"### `[{tier}]`: {cls.__name__}",
            "",
            TIER_HELP[tier],
            "",
            _row("field", "type", "default", "environment", "meaning"),
            "|---|---|---|---|---|",
        ]
        kinds = options.kinds(cls)
        for field in dataclasses.fields(cls):
            kind = kinds[field.name]
            env = (
                "TOML only"
                if kind.base is dict
                else f"`MTCKPT_{tier.upper()}_{field.name.upper()}`"
            )
            lines.append(_row(
                f"`{field.name}`", _kind(kind.base, kind.optional), _default(field), env,
                _help_of(field, f"{tier}.{field.name}")
                + _selection_note(tier, field.name, selection),
            ))  # fmt: skip
    return lines


def daemon_section(daemon: argparse.ArgumentParser) -> list[str]:
    from mtckpt.daemon import config as daemon_config
    from mtckpt.daemon.config import DaemonConfig

    flags = _flags(daemon)
    declared = set(daemon_config.DAEMON_OPTIONS)
    if declared ^ (set(flags) - {"config"}):
        raise SystemExit(
            "daemon_config.DAEMON_OPTIONS and the flags of `mtckpt daemon` differ: "
            f"{sorted(declared ^ (set(flags) - {'config'}))}"
        )
    fields = {field.name: field for field in dataclasses.fields(DaemonConfig)}
    lines = [
        "## Daemon options",
        "",
        f"`mtckpt daemon`. {_cell(daemon.description)} The TOML keys are in the `[daemon]` "
        "table; `peers` is a list there and a comma list in a variable or a flag.",
        "",
        _row("flag", "TOML key", "environment", "type", "default", "meaning"),
        "|---|---|---|---|---|---|",
    ]
    for key, kind in daemon_config.DAEMON_OPTIONS.items():
        action = flags[key]
        env = f"`MTCKPT_DAEMON_{key.upper()}`"
        if key == "node_id":
            env += ", `MTCKPT_NODE_ID`"
        default = DAEMON_DEFAULTS.get(key) or _default(fields[key])
        lines.append(_row(f"`{action.option_strings[-1]}`", f"`{key}`", env,
                          _kind(kind, False), default, _help_of(fields[key], key)))  # fmt: skip
    lines += [
        "",
        f"`--config FILE`: {flags['config'].help}. The daemon's object tier takes the "
        "file's `[remote]` table (and `MTCKPT_REMOTE_*`), at the URL of `--remote` when "
        "that is given.",
    ]
    return lines


def render() -> str:
    from mtckpt import cli

    top = cli.parser()
    selection = _flags(_subparser(top, "ls"))
    lines = [
        "<!-- Generated by tools/gen_config_docs.py from src/mtckpt/config.py, the",
        "     CheckpointManager signature, DaemonConfig and the `mtckpt daemon` parser.",
        "     Do not edit: run `python tools/gen_config_docs.py`. -->",
        "",
        "# Configuration reference",
        "",
        "Every option of the library and the daemon, with its TOML key, its environment "
        "variable and its default. The same options come from Python, from a TOML file "
        "(`CheckpointManager.from_config(path)`, `mtckpt --config`, default `$MTCKPT_CONFIG`) "
        "or from `MTCKPT_*` variables, which override the file; keyword arguments of "
        "`from_config` override both. In a variable, an option that may be unset takes "
        "`none` or an empty value; a boolean takes `1`, `true`, `yes`, `on` or `0`, "
        "`false`, `no`, `off`. An unknown key in the file is an error that lists the known "
        "ones.",
        "",
        "```toml",
        'run = "exp1"',
        "[memory]",
        'path = "/dev/shm/mtckpt"',
        "keep = 2",
        "[local]",
        'path = "/mnt/nvme/ckpt"',
        "every = 10",
        "```",
        "",
        *manager_section(selection),
        "",
        *tier_sections(selection),
        "",
        *daemon_section(_subparser(top, "daemon")),
        "",
        "## Other environment variables",
        "",
        "| variable | meaning |",
        "|---|---|",
        "| `MTCKPT_CONFIG` | the TOML file read by `from_config()`, `mtckpt` and "
        "`mtckpt daemon` when none is given |",
        "| `MTCKPT_NATIVE` | `auto` (default), `require` or `off`: the native fast path or "
        "its numpy fallback |",
        "| `RANK`, `WORLD_SIZE` | rank and world size when no distributed engine is initialised |",
        "| `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | the ranks on this node, which share its tiers "
        "(unset: the ranks sharing this node's memory root, asked in a process group; "
        "without one, every rank) |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text() != text:
            stale = f"{OUT.relative_to(ROOT)} is stale: run tools/gen_config_docs.py"
            print(stale, file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
