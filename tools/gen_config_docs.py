"""Generate docs/configuration.md from the option declarations.

Names, types, defaults, TOML keys and ``MTCKPT_*`` variables come from
``src/mtckpt/config.py`` (the tier dataclasses, ``_FIELD_KINDS``, ``_OPTIONAL``,
``MANAGER_OPTIONS``, ``DAEMON_OPTIONS``), the manager's defaults from the signature of
``CheckpointManager``, the daemon's defaults from ``DaemonConfig`` and its flags and their
help from the argparse parser of ``mtckpt daemon`` (``mtckpt.cli.parser``). The meanings of
the manager's and the tiers' options are not declared in the source yet; they are in
``MANAGER_HELP`` and ``FIELD_HELP`` below, and the generator fails when an option has no
meaning or a meaning has no option (a field's ``metadata["help"]``, once the declarations
carry one, is used instead).

    python tools/gen_config_docs.py           # rewrite docs/configuration.md
    python tools/gen_config_docs.py --check   # exit 1 if docs/configuration.md is stale

Needs the package importable with its ``grpc`` extra (the daemon's defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"

MANAGER_HELP = {
    "run": "The run's name: its directory on every tier. 1-128 letters, digits, `.`, `_` "
    "or `-`, starting with a letter or digit. Required (`from_config` refuses a file "
    "without it).",
    "rank": "This process's rank. Unset: `torch.distributed` or `jax.distributed` when "
    "initialised, else `RANK`, else 0.",
    "world_size": "The number of ranks. Unset: `torch.distributed` or `jax.distributed` "
    "when initialised, else `WORLD_SIZE`, else 1.",
    "allow_pickle": "Save (and restore) leaves of other types with pickle. Needed on both "
    "sides; only for checkpoints you trust.",
    "chunk_size": "Bytes per crc32c chunk of a data file (at least 4096). A restore "
    "verifies the whole chunks under the bytes it reads.",
    "threads": "Threads for staging copies, checksums and verification. Unset: the CPU "
    "count, at most 8.",
    "collective_timeout": "Seconds a rank waits for the others: restore's agreement on a "
    "step, and the node's other ranks before a step is committed (`NodeRanksMissingError`).",
    "staging": '`"blocking"`: `save` returns once the arrays may be modified. `"async"`: '
    'once the copy into node memory is started; modify them after `h.wait("staged")`.',
}

# By field name, for every tier that has the field; (tier, field) for one tier only.
FIELD_HELP = {
    ("memory", "path"): "The node's memory tier: a tmpfs directory. Every save is staged "
    "here. With `peers=` leave `memory` out: the daemon's memory root is used.",
    ("local", "path"): "The node-local disk directory, written from the memory tier in the "
    "background (fsync, then rename). Required.",
    "every": "Take every step that is a multiple of this. `every` and `interval` may both "
    "be set; at least one must be.",
    "interval": "Also take a step when this many seconds have passed since the tier's last one.",
    "keep": "Complete steps kept on the tier; older ones go once the newest complete one "
    "has passed checksum verification there.",
    "daemon": "Address of this node's daemon: `unix:///PATH` or `HOST:PORT`.",
    "replicas": 'Copies on peers that `h.wait("peers")` expects; the daemon must make at '
    'least as many. 0: no "peers" stage (the daemon only holds node memory and uploads).',
    "token_file": "File holding the daemon's shared token, sent with every call.",
    "timeout": "Seconds the trainer waits for its replicas, the daemon's uploads or a "
    "recovery before it fails.",
    "url": "Any fsspec URL: `s3://bucket/prefix`, `gs://`, `file://`, `memory://`. Required.",
    "keep_every": "Also keep every complete step that is a multiple of this.",
    "storage_options": "Passed to the fsspec filesystem (`endpoint_url`, `key`, ...). A "
    "table: TOML only.",
    "part_size": "Files larger than this go up as multipart uploads of parts this size "
    "(at least 5 MiB).",
    "concurrency": "Parts uploaded, and ranged reads made, at a time.",
    "retries": "Times a failed request is retried, with exponential backoff.",
    "compression": '`"zstd"` stores data files as zstd frames (needs `mtckpt[zstd]`); '
    "unset: as they are.",
    "compression_level": "The zstd level.",
    "backlog": '`"newest"`: a step due while a flush runs replaces older waiting ones '
    '(logged). `"queue"`: every due step waits its turn, keeping its node-memory copy.',
    "uploader": 'Without a node daemon: `"process"` uploads from a helper process (the '
    "trainer's GIL stays free), `\"thread\"` on the trainer's threads (`storage_options` "
    'that do not pickle). `"auto"`: `"process"`, except for `memory://` and filesystems '
    "registered at run time.",
}

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
    "token_file": "none",
    "tls_cert": "none",
    "tls_key": "none",
    "tls_ca": "none",
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


def _help_of(field: dataclasses.Field | None, key: str | tuple[str, str]) -> str:
    if field is not None and field.metadata.get("help"):
        return field.metadata["help"]
    if isinstance(key, tuple):
        if key in FIELD_HELP:
            return FIELD_HELP[key]
        key = key[1]
    if key in FIELD_HELP:
        return FIELD_HELP[key]
    if key in MANAGER_HELP:
        return MANAGER_HELP[key]
    raise SystemExit(f"tools/gen_config_docs.py: option {key!r} has no meaning: add one")


def _selection_note(tier: str, name: str, selection: dict[str, argparse.Action]) -> str:
    flag = SELECTION_FLAGS.get((tier, name))
    if flag is None:
        return ""
    (action,) = [a for a in selection.values() if flag in a.option_strings]
    metavar = f" {action.metavar}" if action.metavar else ""
    return f" Command line: `{flag}{metavar}`."


def manager_section(selection: dict[str, argparse.Action]) -> list[str]:
    from mtckpt import CheckpointManager, config

    params = inspect.signature(CheckpointManager.__init__).parameters
    missing = set(MANAGER_HELP) ^ set(config.MANAGER_OPTIONS)
    if missing:
        raise SystemExit(f"MANAGER_HELP and config.MANAGER_OPTIONS differ: {sorted(missing)}")
    lines = [
        "## Manager options",
        "",
        "Keyword arguments of `mtckpt.CheckpointManager` (`run` may be given by position), "
        "top-level keys of the TOML file, and `MTCKPT_` + the name in upper case.",
        "",
        _row("option", "type", "default", "environment", "meaning"),
        "|---|---|---|---|---|",
    ]
    for name, kind in config.MANAGER_OPTIONS.items():
        param = params[name]
        default = "required" if param.default is inspect.Parameter.empty else param.default
        default = default if default == "required" else _format_default(default)
        lines.append(_row(
            f"`{name}`", _kind(kind, name in config._OPTIONAL), default,
            f"`MTCKPT_{name.upper()}`",
            _help_of(None, name) + _selection_note("", name, selection),
        ))  # fmt: skip
    return lines


def tier_sections(selection: dict[str, argparse.Action]) -> list[str]:
    from mtckpt import config

    lines = [
        "## Tier options",
        "",
        "Each tier is a frozen dataclass passed to the manager (`memory=`, `local=`, `peers=`, "
        "`remote=`), a table of the TOML file (`[memory]`, `[local]`, `[peers]`, "
        "`[remote]`), and `MTCKPT_` + the table + `_` + the field in upper case.",
    ]
    used: set[object] = set()
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
        for field in dataclasses.fields(cls):
            if field.name not in config._FIELD_KINDS:
                raise SystemExit(f"config._FIELD_KINDS has no kind for {tier}.{field.name}")
            kind = config._FIELD_KINDS[field.name]
            if field.default is not dataclasses.MISSING:
                default = _format_default(field.default)
            elif field.default_factory is not dataclasses.MISSING:
                default = _format_default(field.default_factory())
            else:
                default = "required"
            env = "TOML only" if kind is dict else f"`MTCKPT_{tier.upper()}_{field.name.upper()}`"
            key = (tier, field.name) if (tier, field.name) in FIELD_HELP else field.name
            used.add(key)
            lines.append(_row(
                f"`{field.name}`", _kind(kind, field.name in config._OPTIONAL), default, env,
                _help_of(field, key) + _selection_note(tier, field.name, selection),
            ))  # fmt: skip
    stale = set(FIELD_HELP) - used
    if stale:
        raise SystemExit(f"FIELD_HELP has meanings of no tier field: {sorted(map(str, stale))}")
    return lines


def daemon_section(daemon: argparse.ArgumentParser) -> list[str]:
    from mtckpt import config
    from mtckpt.daemon.service import DaemonConfig

    flags = _flags(daemon)
    declared = set(config.DAEMON_OPTIONS)
    if declared ^ (set(flags) - {"config"}):
        raise SystemExit(
            "config.DAEMON_OPTIONS and the flags of `mtckpt daemon` differ: "
            f"{sorted(declared ^ (set(flags) - {'config'}))}"
        )
    defaults = {}
    for field in dataclasses.fields(DaemonConfig):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = _format_default(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = _format_default(field.default_factory())
    lines = [
        "## Daemon options",
        "",
        f"`mtckpt daemon`. {_cell(daemon.description)} The TOML keys are in the `[daemon]` "
        "table; `peers` is a list there and a comma list in a variable or a flag.",
        "",
        _row("flag", "TOML key", "environment", "type", "default", "meaning"),
        "|---|---|---|---|---|---|",
    ]
    for key, kind in config.DAEMON_OPTIONS.items():
        action = flags[key]
        env = f"`MTCKPT_DAEMON_{key.upper()}`"
        if key == "node_id":
            env += ", `MTCKPT_NODE_ID`"
        default = DAEMON_DEFAULTS.get(key) or defaults.get(key)
        if default is None:
            raise SystemExit(f"no default known for daemon option {key!r}")
        lines.append(_row(f"`{action.option_strings[-1]}`", f"`{key}`", env,
                          _kind(kind, False), default, action.help or ""))  # fmt: skip
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
